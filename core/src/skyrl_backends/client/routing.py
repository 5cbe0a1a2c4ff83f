"""Which engine serves which prompt, and putting a split batch back together.

Prompts with a session id go where the consistent-hash ring puts the session (so every turn of a
conversation reaches the engine holding its prefix cache); prompts without one go to the least
loaded engine, counting the prompts already in flight there plus those this batch has just given
it, so one large batch is spread evenly rather than piled onto the engine that was idle first.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Literal

from skyrl_backends.client.hashing import ConsistentHashRing
from skyrl_backends.types import Completion

SessionRouting = Literal["consistent_hash", "random"]


class LoadTracker:
    """Prompts in flight per engine, as the client sees them."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def add(self, engine_id: str, count: int) -> None:
        self._inflight[engine_id] = self._inflight.get(engine_id, 0) + count

    def done(self, engine_id: str, count: int) -> None:
        left = self._inflight.get(engine_id, 0) - count
        self._inflight[engine_id] = max(left, 0)

    def get(self, engine_id: str) -> int:
        return self._inflight.get(engine_id, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self._inflight)


class Router:
    """Assigns the prompts of a batch to engines.

    ``session_routing="random"`` sends each turn of a session to a random engine; it exists only as
    the baseline of the sticky-routing benchmark.
    """

    def __init__(self, ring: ConsistentHashRing, load: LoadTracker,
                 session_routing: SessionRouting = "consistent_hash", seed: int = 0) -> None:
        if session_routing not in ("consistent_hash", "random"):
            raise ValueError(f"session_routing must be 'consistent_hash' or 'random', got {session_routing!r}")
        self.ring = ring
        self.load = load
        self.session_routing = session_routing
        self._random = random.Random(seed)
        self._next_tie_break = 0

    def engine_for_session(self, session_id: str, usable: Sequence[str]) -> str | None:
        if self.session_routing == "random":
            return self._random.choice(list(usable)) if usable else None
        return self.ring.lookup(session_id, usable)

    def assign(self, session_ids: Sequence[str | None] | None, num_prompts: int,
               usable: Sequence[str], weight: int = 1) -> dict[str, list[int]]:
        """``{engine_id: [prompt indices]}`` over the usable engines (in their given order).

        ``weight`` is how many sequences each prompt becomes (``n``), for the load estimate."""
        if not usable:
            raise LookupError("no usable engine")
        usable = list(usable)
        projected = {e: self.load.get(e) for e in usable}
        assignment: dict[str, list[int]] = {}
        for index in range(num_prompts):
            session = session_ids[index] if session_ids else None
            engine = self.engine_for_session(session, usable) if session is not None else None
            if engine is None:
                engine = self._least_loaded(usable, projected)
            assignment.setdefault(engine, []).append(index)
            projected[engine] += weight
        return assignment

    def _least_loaded(self, usable: list[str], projected: Mapping[str, int]) -> str:
        # Ties rotate, so an idle pool fills round-robin instead of always starting at engine 0.
        start = self._next_tie_break % len(usable)
        order = usable[start:] + usable[:start]
        best = min(order, key=lambda e: projected[e])
        self._next_tie_break += 1
        return best


def reassemble(num_prompts: int, samples_per_prompt: int,
               parts: Sequence[tuple[Sequence[int], Sequence[Completion]]]) -> list[Completion]:
    """Completions in the caller's prompt order from per-engine parts.

    Each part is ``(prompt indices, completions)`` with ``samples_per_prompt`` completions per
    prompt, prompt-major, as an engine returns them."""
    ordered: list[list[Completion] | None] = [None] * num_prompts
    for indices, completions in parts:
        if len(completions) != len(indices) * samples_per_prompt:
            raise ValueError(f"a part has {len(completions)} completions for {len(indices)} prompts "
                             f"x {samples_per_prompt} samples")
        for k, index in enumerate(indices):
            ordered[index] = list(completions[k * samples_per_prompt:(k + 1) * samples_per_prompt])
    missing = [i for i, c in enumerate(ordered) if c is None]
    if missing:
        raise ValueError(f"prompts {missing[:5]} got no completion")
    return [c for group in ordered for c in group]  # type: ignore[union-attr]
