"""The fixed set of rollouts every consistency run generates, so that columns compare like with like.

Each sampling setting is run at each response length, with more prompts at the short lengths (so the
per-sequence ratios have a spread to show) and fewer at the long ones (which hold most of the
tokens). ``ignore_eos`` makes every response exactly as long as asked. Prompts are drawn from the
model's ordinary tokens with a fixed seed. Every request carries its own seed, derived from the
request alone, so the tokens drawn do not depend on how the engine batched the requests; a plan may
be *unseeded* instead (only the engine gets a seed) for an engine whose seeded requests take another
path than a trainer's unseeded ones (SGLang's plugin samples seeded requests itself and rescores
their log-probabilities with a prefill).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

from skyrl_backends.errors import ConfigError

ENGINE_RESERVED_POSITIONS = 2


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its name in reports and its parameters."""

    name: str
    temperature: float
    top_p: float = 1.0


@dataclass(frozen=True)
class Length:
    """Responses of ``tokens`` tokens, for ``prompts`` prompts."""

    tokens: int
    prompts: int


@dataclass(frozen=True)
class RolloutPlan:
    settings: tuple[Setting, ...] = (Setting("t1.0", 1.0), Setting("t0.7-p0.9", 0.7, 0.9))
    lengths: tuple[Length, ...] = (Length(32, 8), Length(256, 4), Length(1000, 2))
    prompt_tokens: tuple[int, int] = (8, 16)  # shortest and longest prompt
    prompt_seed: int = 2222
    engine_seed: int = 1234
    # A seed per request (engine_seed + its index). False: requests carry none and only the engine
    # is seeded, for engines whose seeded requests take another path (SGLang's plugin).
    seeded: bool = True

    def requests(self) -> list[tuple[Setting, Length]]:
        """Every (setting, length) pair, in the order they are generated (one generate call each)."""
        return [(setting, length) for setting in self.settings for length in self.lengths]

    def request_seed(self, setting: Setting, length: Length, prompt_index: int) -> int | None:
        """The seed of one request (None when the plan is unseeded). It depends on the request
        alone, so a plan with fewer settings or lengths draws the same tokens for those it keeps."""
        if not self.seeded:
            return None
        return self.engine_seed + 1_000_000 * (zlib.crc32(setting.name.encode()) % 1000) + 1000 * length.tokens \
            + prompt_index

    @property
    def max_sequence(self) -> int:
        """The longest prompt plus the longest response."""
        return self.prompt_tokens[1] + max(length.tokens for length in self.lengths)

    @property
    def total_tokens(self) -> int:
        return len(self.settings) * sum(length.tokens * length.prompts for length in self.lengths)

    def check_fits(self, max_positions: int) -> None:
        """Every request must fit the model's context, less the positions an engine keeps for itself
        (SGLang caps a request's new tokens at its context length minus the prompt minus 2)."""
        if self.max_sequence > max_positions - ENGINE_RESERVED_POSITIONS:
            raise ConfigError("lengths", f"the longest prompt ({self.prompt_tokens[1]}) plus the longest response "
                                         f"({max(length.tokens for length in self.lengths)}) exceed the model's "
                                         f"{max_positions} positions less {ENGINE_RESERVED_POSITIONS} that engines "
                                         "keep; ask for shorter responses.")

    def to_dict(self) -> dict[str, Any]:
        return {"settings": [asdict(s) for s in self.settings], "lengths": [asdict(n) for n in self.lengths],
                "prompt_tokens": list(self.prompt_tokens), "prompt_seed": self.prompt_seed,
                "engine_seed": self.engine_seed, "seeded": self.seeded, "total_tokens": self.total_tokens}


DEFAULT_PLAN = RolloutPlan()


def parse_lengths(text: str) -> tuple[Length, ...]:
    """``"32x8,256x4,1000x2"`` (tokens x prompts) -> lengths; the command line's ``--lengths``."""
    lengths = []
    for item in text.split(","):
        tokens, _, prompts = item.strip().partition("x")
        try:
            length = Length(int(tokens), int(prompts or 1))
        except ValueError:
            raise ConfigError("lengths", f"{item!r} is not TOKENSxPROMPTS (e.g. 1000x2)") from None
        if length.tokens < 1 or length.prompts < 1:
            raise ConfigError("lengths", f"{item!r}: tokens and prompts must be >= 1")
        lengths.append(length)
    return tuple(lengths)
