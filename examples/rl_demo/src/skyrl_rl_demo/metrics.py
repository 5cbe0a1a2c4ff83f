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


def learned_bar(fixed_answer_reward: float) -> float:
    """The last window's reward a run must reach to count as learned, beyond doubling its first: a
    tenth of the way from what one fixed answer earns (a policy that collapsed onto one digit, without
    reading the prompt) to a perfect score."""
    return fixed_answer_reward + 0.1 * (1.0 - fixed_answer_reward)


def summarize(rows: Sequence[dict[str, Any]], window: int = WINDOW,
              fixed_answer_reward: float | None = None) -> dict[str, Any]:
    """Reward and accuracy at both ends of the run, and the mean cost of each phase of a step.

    ``fixed_answer_reward``: what always giving the same answer earns (for the demo's task, one over
    the number of digits it asks for); a run counts as learned only above :func:`learned_bar` of it."""
    rewards = [r["reward_mean"] for r in rows]
    w = min(window, max(1, len(rows) // 2))
    first, last = mean(rewards[:w]), mean(rewards[-w:])
    doubled = last >= 2 * first and last > first
    above_fixed = fixed_answer_reward is None or last >= learned_bar(fixed_answer_reward)
    judged = len(rows) >= 2 * window  # over two full windows; a shorter run says nothing either way
    summary: dict[str, Any] = {
        "steps": len(rows),
        "window": w,
        "reward_first": first,
        "reward_last": last,
        "reward_ratio": last / first if first > 0 else math.inf,
        "exact_first": mean([r["exact_rate"] for r in rows[:w]]),
        "exact_last": mean([r["exact_rate"] for r in rows[-w:]]),
        "learned": doubled and above_fixed if judged else None,
        # Which test a judged run failed: "doubling" (the last window's reward is not twice the
        # first's) or "fixed_answer" (it is, but not above what one fixed answer earns, learned_bar).
        "failed_test": (None if not judged or (doubled and above_fixed)
                        else "doubling" if not doubled else "fixed_answer"),
        "fixed_answer_reward": fixed_answer_reward,
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
