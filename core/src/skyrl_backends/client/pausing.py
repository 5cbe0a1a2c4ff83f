"""How the client pauses each engine of its pool, and which requests a weight update must cut.

Every pause mode works on every engine behind the client:

* ``keep`` freezes in-flight requests. An engine that pauses natively *and* labels its tokens with
  weight versions keeps them itself (``pause_generation("keep")``; with ``recompute``, only if it
  can recompute kept caches). Any other engine that can abort has its requests aborted and, on
  resume, continued as continuations (prompt + tokens so far, a fresh prefill under the weights
  current then: what recomputation gives, and exact versions by construction). An engine that can
  do neither is drained.
* ``abort`` and ``wait`` are asked of each engine (its facade emulates them where the engine has no
  such mode); the client adds nothing but holding its own new requests back.

``max_staleness`` bounds how many weight versions one segment of a request (the tokens an engine
generates on top of one prefill) may span: a segment the next update would take past that is cut
before the update lands and continued afterwards on a fresh prefill under the new weights.
"""

from __future__ import annotations

from typing import Literal

from skyrl_backends.capabilities import Capabilities

KeepStrategy = Literal["auto", "continue"]
KEEP_STRATEGIES: tuple[str, ...] = ("auto", "continue")

# How one engine is paused: its own pause_generation(mode), abort-and-continue, or a drain.
PauseKind = Literal["engine", "continue", "drain"]


def keeps_natively(caps: Capabilities, recompute: bool) -> bool:
    """Whether an engine with ``caps`` keeps requests across a weight update itself, with exact
    per-token versions (and recomputes their caches when asked)."""
    return caps.native_pause and caps.token_versions and (caps.recompute_on_resume or not recompute)


def pause_kind(caps: Capabilities, mode: str, recompute: bool, keep_strategy: str) -> PauseKind:
    """How the client pauses an engine with ``caps`` in ``mode``."""
    if mode != "keep":
        return "engine"
    if keep_strategy == "auto" and keeps_natively(caps, recompute):
        return "engine"
    return "continue" if caps.abort else "drain"


def stale_segments(started_at: dict[str, int], next_version: int, max_staleness: int | None) -> list[str]:
    """The engine request ids (of ``{engine request id: version its segment started under}``) whose
    segment would span more than ``max_staleness + 1`` versions once ``next_version`` is loaded."""
    if max_staleness is None:
        return []
    return [rid for rid, start in started_at.items() if next_version - start > max_staleness]


def check_max_staleness(max_staleness: int | None) -> None:
    if max_staleness is not None and (isinstance(max_staleness, bool) or not isinstance(max_staleness, int)
                                      or max_staleness < 0):
        raise ValueError(f"max_staleness must be an integer >= 0 (0: every update cuts every request in "
                         f"flight) or None (no bound), got {max_staleness!r}")


def check_keep_strategy(keep_strategy: str) -> None:
    if keep_strategy not in KEEP_STRATEGIES:
        raise ValueError(f"keep_strategy must be one of {list(KEEP_STRATEGIES)} ('auto': engines that can keep "
                         f"requests themselves do; 'continue': always abort and continue), got {keep_strategy!r}")
