"""Weight-version labels on tokens: the engine facade's check, and a helper for backends.

A backend that declares ``token_versions`` labels every token with the version of the weights that
chose it (hookspec ``skyrl_backends_update_named_weights``); the facade checks that the labels cover
exactly the tokens and name only versions the engine served while the request ran
(:func:`labelled`). A backend that does not label gets the version its request was admitted under,
which is exact because the facade applies no weight update under its requests.

:class:`UpdateWatch` serves backends whose engine reports a request's versions only with its end
(vLLM's and SGLang's span lists): until then, a request's tokens are known to come from the version
it started under only while no update has begun since, so a stream may hand them out at once, and
holds them back (to the final chunk, labelled from the engine's spans) once one has.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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


@dataclass(frozen=True)
class UpdateMark:
    """What :meth:`UpdateWatch.mark` saw when a request started."""

    version: int
    updates_begun: int
    during_update: bool


class UpdateWatch:
    """Weight updates as a backend applies them: the version its weights hold, and whether one
    has begun since a request started."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._begun = 0
        self._running = 0
        self._idle: asyncio.Event | None = None

    @asynccontextmanager
    async def updating(self, version: int) -> AsyncIterator[None]:
        """Around the application of an update to ``version``; the version is adopted only if the
        block succeeds."""
        self._begun += 1
        self._running += 1
        try:
            yield
            self.version = version
        finally:
            self._running -= 1
            if not self._running and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Until no update is being applied (a request submitted now runs on settled weights)."""
        while self._running:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def mark(self) -> UpdateMark:
        return UpdateMark(self.version, self._begun, self._running > 0)

    def unchanged_since(self, mark: UpdateMark) -> bool:
        """Whether every token produced since ``mark`` comes from ``mark.version``."""
        return not mark.during_update and self._begun == mark.updates_begun
