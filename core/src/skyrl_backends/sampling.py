"""The one canonical set of sampling parameters every backend accepts.

Validation happens here, before any engine sees a request: an unknown key or an out-of-range value
raises :class:`~skyrl_backends.errors.SamplingParamsError` naming the field, the value and what is
accepted. Backends translate a valid ``SamplingParams`` into their engine's own format through the
``skyrl_backends_translate_sampling_params`` hook, and must reject (never drop) what they cannot
honour.

Semantics shared by every backend (the conformance suite checks them):

* ``max_generate_length`` is exact: a sequence that does not stop earlier has exactly that many
  response tokens, finish reason ``"length"``.
* ``stop_token_ids`` and EOS end a sequence *with* that token as the last response token, finish
  reason ``"stop"`` (unless ``ignore_eos`` for EOS).
* ``stop`` strings end a sequence at the first token whose decoded text completes a match; that
  token is the last response token, and the response text ends exactly where the stop string ends
  (the string is included). ``stop_reason`` holds the matched string. (The OpenAI-compatible
  HTTP endpoint follows OpenAI instead and leaves the stop string out of the text it returns.)
* ``min_new_tokens`` suppresses EOS and stop token ids until that many tokens were generated.
* ``logprobs=None`` returns no log-probabilities, ``0`` the chosen token's, ``N`` the chosen token's
  plus the top ``N`` alternatives.
* ``seed`` makes sampling reproducible per sequence, whatever else is in the batch. With ``n > 1``
  sample ``j`` of a prompt uses ``seed + j``.
* ``detokenize=False`` returns completions without their text (``text`` is None), for callers that
  use the token ids only (as vLLM's ``SamplingParams.detokenize``): decoding every response costs
  milliseconds of Python per batch. Token ids, log-probabilities and stop handling are unchanged
  (stop strings are still matched on the decoded text inside the backend).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from skyrl_backends import limits
from skyrl_backends.errors import SamplingParamsError

# The smallest positive temperature and repetition penalty: dividing logits by less overflows them
# to infinity and turns sampling into NaN (a crash, not a sharper distribution). Greedy is 0.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 1e-5
# Seeds must fit the engines' 64-bit signed generators, ``seed + n - 1`` included.
MAX_SEED = 2**63 - 1

# Names the design's configuration uses for the same thing, accepted on input so a SkyRL-style
# config works unchanged. They are translated, never stored under the alias.
_ALIASES = {"max_tokens": "max_generate_length", "max_new_tokens": "max_generate_length",
            "min_tokens": "min_new_tokens"}


@dataclass(frozen=True)
class SamplingParams:
    """Canonical sampling parameters (immutable; use :meth:`replace` to derive new ones)."""

    max_generate_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    detokenize: bool = True

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params stay hashable.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise SamplingParamsError.out_of_range(name, value, "a list" + (" of strings" if name == "stop"
                                                                               else " of token ids"))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, accepted: str) -> None:
            value = getattr(self, name)
            # Show lists as the user wrote them, not as the tuples they were frozen into.
            raise SamplingParamsError.out_of_range(name, list(value) if isinstance(value, tuple) else value, accepted)

        if not _is_int(self.max_generate_length) or self.max_generate_length < 1:
            fail("max_generate_length", "an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0 \
                or 0 < self.temperature < MIN_TEMPERATURE:
            fail("temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            fail("top_k", "-1 (disabled) or an integer >= 1")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or not self.repetition_penalty >= MIN_REPETITION_PENALTY:
            fail("repetition_penalty", f"a finite number >= {MIN_REPETITION_PENALTY} (1.0 disables it)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "None (off), 0 (chosen token only) or N >= 1 (chosen plus top N)")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of non-negative integer token ids")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            fail("min_new_tokens", "an integer >= 0")
        if self.min_new_tokens > self.max_generate_length:
            raise SamplingParamsError.out_of_range(
                "min_new_tokens", self.min_new_tokens,
                f"at most max_generate_length ({self.max_generate_length})")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "true or false")
        if not isinstance(self.detokenize, bool):
            fail("detokenize", "true (completions carry their text) or false (token ids only)")
        if not _is_int(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        if self.n > limits.max_n():
            fail("n", f"at most {limits.max_n()} (skyrl_backends.limits; raise it with {limits.MAX_N_ENV}=...)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED - (self.n - 1)):
            fail("seed", f"None or an integer in [0, {MAX_SEED - (self.n - 1)}] (2**63 - 1 less n - 1: sample j "
                         f"uses seed + j, a 64-bit signed value)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a plain mapping (YAML, JSON, a SkyRL config), rejecting unknown keys."""
        if values is None:
            return cls()
        if isinstance(values, SamplingParams):
            return values
        if not isinstance(values, Mapping):
            raise SamplingParamsError("sampling_params", f"expected a mapping of parameter names to values (or a "
                                                         f"SamplingParams), got {type(values).__name__}.")
        names = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            canonical = _ALIASES.get(key, key)
            if canonical not in names:
                raise SamplingParamsError.unknown_key(key, names, "sampling_params")
            if canonical in kwargs:
                raise SamplingParamsError(key, f"given twice (as {key!r} and {canonical!r}).")
            kwargs[canonical] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        return values

    def replace(self, **changes: Any) -> SamplingParams:
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise SamplingParamsError.unknown_key(sorted(unknown)[0], self.field_names(), "sampling_params")
        return dataclasses.replace(self, **changes)

    def uses(self) -> set[str]:
        """The fields set to something other than their default (what a backend must honour)."""
        default = SamplingParams()
        return {f for f in self.field_names() if getattr(self, f) != getattr(default, f)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["SamplingParams"]
