"""The engine facade's check of the weight versions a backend puts on its tokens.

A backend that declares ``token_versions`` labels every token with the version of the weights that
chose it (hookspec ``skyrl_backends_update_named_weights``); the facade checks that the labels cover
exactly the tokens and name only versions the engine served while the request ran. A backend that
does not label gets the version its request was admitted under, which is exact because the facade
applies no weight update under its requests.
"""

from __future__ import annotations

from skyrl_backends.errors import EngineStateError
from skyrl_backends.types import TokenVersions


def labelled(given: TokenVersions | None, num_tokens: int, admitted: int, current: int, declared: bool,
             backend: str, what: str) -> TokenVersions:
    """The versions of ``num_tokens`` tokens of a request admitted at version ``admitted`` and
    returned (or streamed) while the engine serves version ``current``."""
    if given is None:
        if declared and current != admitted and num_tokens:
            raise EngineStateError(
                f"backend {backend!r} declares token_versions but gave {what} no versions, and the weights "
                f"changed from version {admitted} to {current} while it ran")
        return TokenVersions.uniform(num_tokens, admitted)
    if not isinstance(given, TokenVersions):
        raise EngineStateError(f"backend {backend!r} gave {what} token_versions of type {type(given).__name__}")
    if given.length != num_tokens:
        raise EngineStateError(f"backend {backend!r} labelled {given.length} token(s) of {what}, which has "
                               f"{num_tokens}")
    if given.runs and not (admitted <= given.oldest <= given.newest <= current):  # type: ignore[operator]
        raise EngineStateError(f"backend {backend!r} labelled {what} with versions {given.oldest}..{given.newest}, "
                               f"outside the versions {admitted}..{current} served while it ran")
    return given if given.runs else TokenVersions.uniform(0, admitted)
