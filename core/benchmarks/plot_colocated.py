"""Draw where a colocated sync's time goes, from ``bench_weight_sync.py --json`` runs (not a test).

One panel per model shape and commit found in the files; per case (the copy floor, the warm CUDA
IPC sync, the adopted one, and where recorded the adopted one applied by a copy per tensor from
Python, ``--apply copy_all``) a bar of the pooled median time, split into the parts the benchmark records: the
trainer's pack (plan and write) and request JSON, the engine's parse of it, its receive (open,
view) and apply, and the rest (the pipe both ways, the processes' wake-ups, the reply). The
parts are medians of each run's median, pooled by their median, so they add up to the total only
approximately; the rest is what the total leaves, never below zero.

    python core/benchmarks/plot_colocated.py docs/benchmark-results/2026-12-05-f/colocated-*.json \
        --out docs/images/colocated_sync_59c64f2.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

CASES = ("(a) device-to-device copy", "cuda_ipc (warm: buffers reused)", "cuda_ipc, adopted (nothing packed)",
         "cuda_ipc, adopted (nothing packed), copy_all apply")
SHORT = {CASES[0]: "copy floor", CASES[1]: "CUDA IPC, warm", CASES[2]: "CUDA IPC, adopted",
         CASES[3]: "adopted, a copy each\nfrom Python"}
# encode and parse are recorded since the third session of 2026-12-06; older runs have neither (drawn as 0, so
# their time stays in the rest)
PARTS = (("pack_s", "trainer: pack"), ("encode_s", "trainer: request JSON"), ("parse_s", "engine: parse"),
         ("receive_s", "engine: receive"), ("apply_s", "engine: apply"))
PART_COLORS = ("#4c72b0", "#937860", "#da8bc3", "#dd8452", "#55a868", "#c8c8c8")  # the parts, then the rest
FLOOR_COLOR = "#8172b3"


def pooled(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case: the pooled median total (ms) and the median of each part's per-run medians (ms)."""
    times: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for row in run["rows"]:
            if row["strategy"] not in CASES:
                continue
            times[row["strategy"]] += row["times"]
            for key, value in (row.get("parts") or {}).items():
                parts[row["strategy"]][key].append(value)
    return {case: {"total": 1e3 * statistics.median(times[case]),
                   **{key: 1e3 * statistics.median(values) for key, values in parts[case].items()}}
            for case in CASES if times[case]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--by-folder", action="store_true",
                        help="a panel per folder too (runs of one commit on two machines, one folder each)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for path in args.files:
        run = json.load(open(path))
        folder = os.path.basename(os.path.dirname(os.path.abspath(path))) if args.by_folder else ""
        by_panel[(run["args"]["shape"], str(run.get("commit")), folder)].append(run)
    commits = sorted({commit for _, commit, _ in by_panel})
    fig, axes = plt.subplots(len(by_panel), 1, figsize=(8, 1.9 * len(by_panel) + 0.9), squeeze=False)
    for ax, ((shape, commit, folder), runs) in zip(axes[:, 0], by_panel.items(), strict=True):  # the files' order
        cases = pooled(runs)
        labels = list(cases)
        for y, case in enumerate(labels):
            values = cases[case]
            if case == CASES[0]:  # the floor is one copy, no parts
                segments, palette = [(values["total"], "device copy")], (FLOOR_COLOR,)
            else:
                segments = [(values.get(key, 0.0), name) for key, name in PARTS]
                segments.append((max(values["total"] - sum(v for v, _ in segments), 0.0),
                                 "rest: request crossing, Python"))
                palette = PART_COLORS
            left = 0.0
            for (width, name), color in zip(segments, palette, strict=True):
                if width <= 0:  # a part an older run did not record: no bar, no legend entry
                    continue
                ax.barh(y, width, left=left, color=color, label=name)
                left += width
            ax.text(values["total"] + 0.1, y, f"{values['total']:.2f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), [SHORT[c] for c in labels], fontsize=8)
        ax.invert_yaxis()
        where = f" ({folder})" if folder else ""
        ax.set_title(f"{shape} at {commit}{where}: {runs[0]['nbytes'] / 1e9:.2f} GB, {runs[0]['ntensors']} tensors, "
                     f"{len(runs)} runs pooled", fontsize=9)
        ax.set_xlim(0, max(v["total"] for v in cases.values()) * 1.18)
        ax.tick_params(axis="x", labelsize=8)
    widest = max(ax.get_xlim()[1] for ax in axes[:, 0])
    for ax in axes[:, 0]:  # one scale for every panel, so that the panels compare by eye
        ax.set_xlim(0, widest)
    axes[-1, 0].set_xlabel("milliseconds per sync (median)", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"Colocated weight sync on {runs[0]['hardware'].split('; ')[-1]}, commit {', '.join(commits)}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
