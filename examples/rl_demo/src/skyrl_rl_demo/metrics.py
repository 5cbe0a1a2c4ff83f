"""Per-step metrics: a CSV written as training goes, and the run's summary."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# Steps averaged at each end of the run to tell whether the policy learned.
WINDOW = 10


class MetricsCSV:
    """Rows of per-step metrics; the header is the first row's keys. Flushed every row, so a long run
    can be watched (and a crashed one still leaves its numbers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("w", newline="")
        self._writer: csv.DictWriter[str] | None = None
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()
        self.rows.append(dict(row))

    def close(self) -> None:
        self._file.close()


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(rows: Sequence[dict[str, Any]], window: int = WINDOW) -> dict[str, Any]:
    """Reward and accuracy at both ends of the run, and the mean cost of each phase of a step."""
    rewards = [r["reward_mean"] for r in rows]
    w = min(window, max(1, len(rows) // 2))
    first, last = mean(rewards[:w]), mean(rewards[-w:])
    summary: dict[str, Any] = {
        "steps": len(rows),
        "window": w,
        "reward_first": first,
        "reward_last": last,
        "reward_ratio": last / first if first > 0 else math.inf,
        "exact_first": mean([r["exact_rate"] for r in rows[:w]]),
        "exact_last": mean([r["exact_rate"] for r in rows[-w:]]),
        # Judged only over two full windows; a shorter run says nothing either way.
        "learned": bool(last >= 2 * first and last > first) if len(rows) >= 2 * window else None,
    }
    for key in ("generation_tokens_per_s", "generation_s", "update_s", "weight_sync_s", "sleep_s",
                "wake_kv_cache_s", "wake_weights_s", "step_s", "logprob_abs_diff_max", "generation_wait_s",
                "stale_token_fraction", "dropped_token_fraction"):
        if rows and key in rows[0]:
            summary[f"{key}_mean"] = mean([r[key] for r in rows])
    if rows and "logprob_abs_diff_max" in rows[0]:
        summary["logprob_abs_diff_max"] = max(r["logprob_abs_diff_max"] for r in rows)
    if rows and "dropped_token_fraction" in rows[0]:
        summary["dropped_token_fraction_max"] = max(r["dropped_token_fraction"] for r in rows)
    return summary
