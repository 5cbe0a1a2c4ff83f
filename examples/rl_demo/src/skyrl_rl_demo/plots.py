"""The reward curve, as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward_curve(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", window: int = 10) -> Path:
    """Mean episode reward and exact-answer rate per step, each with its moving average."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a machine without a display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, label, color in (("reward_mean", "mean reward", "tab:blue"),
                              ("exact_rate", "exact answers", "tab:green")):
        values = [r[key] for r in rows]
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
                label=f"{label} ({window}-step average)")
    ax.set_xlabel("training step")
    ax.set_ylabel("per step, over all episodes")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
