"""Draw the wake cycle's phases on one time line per side, from ``bench_wake_cycle.py --json`` runs
(not a test).

One panel per folder and commit (a folder holds one machine's calls); in each, skyrl's cycle and the
engine's own calls as bars of their phases laid end to end from the start of the sleep (pooled
medians of each phase), so that where each side's KV cache is awake can be read off one scale. A
KV-cache wake that waits for the sleep to settle ends at the same time on both sides, whatever the
phases before it took.

    python core/benchmarks/plot_wake_cycle.py docs/benchmark-results/2026-12-06-*/vllm-wake-cycle-*.json \\
        --out docs/images/vllm_wake_cycle.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

from bench_wake_cycle import PHASES, phase_rows

COLORS = {"sleep": "#8172b3", "wake_weights": "#4c72b0", "sync": "#dd8452", "wake_kv_cache": "#55a868",
          "first_token": "#c8c8c8"}
SIDES = {"skyrl": "skyrl", "own": "engine's own"}


def pooled_phases(runs: list[dict[str, Any]], side: str) -> dict[str, float]:
    """Per phase, the median (ms) over every round of every run."""
    return {name: 1e3 * statistics.median(t for run in runs for t in phase_rows(run, name)[side]) for name in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for path in args.files:
        run = json.load(open(path))
        by_panel[(os.path.basename(os.path.dirname(os.path.abspath(path))), str(run["commit"]))].append(run)
    fig, axes = plt.subplots(len(by_panel), 1, figsize=(8, 1.3 * len(by_panel) + 1.0), squeeze=False, sharex=True)
    for ax, ((folder, commit), runs) in zip(axes[:, 0], by_panel.items(), strict=True):  # the files' order
        for y, side in enumerate(SIDES):
            left = 0.0
            for name, width in pooled_phases(runs, side).items():
                ax.barh(y, width, left=left, color=COLORS[name], label=name)
                left += width
                if name == "wake_kv_cache":  # where this side's KV cache is awake
                    ax.text(left, y - 0.45, f"{left:.0f}", ha="center", fontsize=7)
        ax.set_yticks(range(len(SIDES)), list(SIDES.values()), fontsize=8)
        ax.invert_yaxis()
        delay = runs[0].get("kv_wake_delay_ms", 0)
        delayed = f", KV wake delayed {delay:g} ms (not drawn)" if delay else ""
        ax.set_title(f"{runs[0]['engine']} {runs[0]['engine_version']} at {commit} ({folder}): {len(runs)} calls"
                     f"{delayed}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("milliseconds from the start of the sleep (pooled medians of each phase)", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle(f"The wake cycle on {runs[0]['hardware'].split('; ')[-1]}: sleep, wake the weights, sync, "
                 "wake the KV cache, first token", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
