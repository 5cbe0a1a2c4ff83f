"""Which engine serves which prompt, and putting a split batch back together.

Prompts with a session id go where the consistent-hash ring puts the session (so every turn of a
conversation reaches the engine holding its prefix cache); prompts without one go to the least
loaded engine, counting the prompts already in flight there plus those this batch has just given
it, so one large batch is spread evenly rather than piled onto the engine that was idle first.
"""

from __future__ import annotations

import math
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

    ``session_load_factor`` (off by default: sessions are strictly sticky) bounds how uneven sticky
    routing may get, as in consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
    2018): a session goes to its ring engine unless that engine already has more than
    ``factor x`` the average number of sequences in flight, and then to the next engine clockwise
    that has room. Sessions move only while their engine is overloaded.
    """

    def __init__(self, ring: ConsistentHashRing, load: LoadTracker,
                 session_routing: SessionRouting = "consistent_hash", seed: int = 0,
                 session_load_factor: float | None = None) -> None:
        if session_routing not in ("consistent_hash", "random"):
            raise ValueError(f"session_routing must be 'consistent_hash' or 'random', got {session_routing!r}")
        if session_load_factor is not None and session_load_factor < 1:
            raise ValueError(f"session_load_factor must be >= 1 (or None), got {session_load_factor!r}")
        self.ring = ring
        self.load = load
        self.session_routing = session_routing
        self.session_load_factor = session_load_factor
        self._random = random.Random(seed)
        self._next_tie_break = 0
        self._bound = 0

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
        # The bound of bounded-load hashing, from the load once this whole batch is placed.
        self._bound = (math.ceil(self.session_load_factor * (sum(projected.values()) + num_prompts * weight)
                                 / len(usable)) if self.session_load_factor is not None else 0)
        assignment: dict[str, list[int]] = {}
        for index in range(num_prompts):
            session = session_ids[index] if session_ids else None
            engine = None
            if session is not None:
                engine = self._bounded_engine(session, usable, projected, weight) \
                    if self.session_load_factor is not None and self.session_routing == "consistent_hash" \
                    else self.engine_for_session(session, usable)
            if engine is None:
                engine = self._least_loaded(usable, projected)
            assignment.setdefault(engine, []).append(index)
            projected[engine] += weight
        return assignment

    def _bounded_engine(self, session: str, usable: list[str], projected: Mapping[str, int], weight: int) -> str:
        bound = self._bound
        engine = self.ring.lookup(session, lambda e: e in projected and projected[e] + weight <= bound)
        return engine if engine is not None else self._least_loaded(usable, projected)

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
