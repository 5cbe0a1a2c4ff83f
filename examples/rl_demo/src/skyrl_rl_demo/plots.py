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
    """Mean episode reward per step with its moving average; below it, the policy's entropy at the
    tokens it generated (when the rows have it), which falls as the policy settles on its answers."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a machine without a display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    rewards = [r["reward_mean"] for r in rows]
    has_entropy = bool(rows) and "entropy" in rows[0]
    fig, axes = plt.subplots(2 if has_entropy else 1, 1, figsize=(7, 5.2 if has_entropy else 4), dpi=110,
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1.3][:2 if has_entropy else 1]})
    ax = axes[0][0]
    ax.plot(steps, rewards, color="tab:blue", alpha=0.3, linewidth=1, label="mean reward per step")
    ax.plot(steps, moving_average(rewards, window), color="tab:blue", linewidth=2,
            label=f"{window}-step average")
    ax.set_ylabel("mean episode reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    if has_entropy:
        ent = axes[1][0]
        ent.plot(steps, [r["entropy"] for r in rows], color="tab:orange", linewidth=1.5)
        ent.set_ylabel("policy entropy\n(nats)")
        ent.grid(alpha=0.3)
    axes[-1][0].set_xlabel("training step")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
