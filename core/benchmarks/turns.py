"""Timings of a case taken in turns with its baseline, summarised the same way by every benchmark
that compares a path through skyrl with the engine's own (not an API)."""

from __future__ import annotations

import statistics
from typing import Any


def against_baseline(times: list[float], base: list[float]) -> dict[str, Any]:
    """Medians in milliseconds, the baseline's median over the case's (above 1: the case is faster),
    the median of the paired ratios (each run against the baseline run of its round) and every
    timing, from ``times`` and ``base`` in seconds, one of each per round."""
    return {"median_ms": round(statistics.median(times) * 1e3, 3),
            "base_median_ms": round(statistics.median(base) * 1e3, 3),
            "ratio_of_medians": round(statistics.median(base) / statistics.median(times), 4),
            "paired": round(statistics.median(b / t for t, b in zip(times, base, strict=True)), 4),
            "times_ms": [round(t * 1e3, 3) for t in times], "base_times_ms": [round(b * 1e3, 3) for b in base]}
