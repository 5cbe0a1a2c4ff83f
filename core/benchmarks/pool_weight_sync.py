"""Pool the JSON results of several ``bench_weight_sync.py --json`` runs (one per machine call) into
the rows of docs/benchmarks.md: per case, the median over every timed sync of every run, the median
of each run, and the paired ratio against the case's baseline pooled over all rounds of all runs (a
round's cases ran back to back, so one round's ratio is not skewed by the machine's state in another
call). Runs of different commits, shapes or bucket sizes are refused: pool like with like.

    python core/benchmarks/pool_weight_sync.py out/call4/vllm-weight-sync-*.json out/call6/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any


def load(paths: list[str]) -> list[dict[str, Any]]:
    runs = [json.load(open(p)) for p in paths]
    if not runs:
        raise SystemExit("no result files given")
    for key in ("commit", "nbytes"):
        values = {str(r.get(key)) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"the runs differ in {key} ({sorted(values)}): pool runs of one commit and shape only")
    buckets = {r["args"]["bucket_bytes"] for r in runs}
    if len(buckets) > 1:
        raise SystemExit(f"the runs differ in bucket size ({sorted(buckets)})")
    return runs


def pool(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per case label, in the order first seen."""
    cases: dict[str, dict[str, Any]] = {}
    for run in runs:
        times = {row["strategy"]: row["times"] for row in run["rows"]}
        for row in run["rows"]:
            case = cases.setdefault(row["strategy"], {"label": row["strategy"], "baseline": row.get("baseline"),
                                                      "compare": row.get("compare"), "times": [], "run_medians": [],
                                                      "paired": [], "compare_paired": []})
            case["times"] += row["times"]
            case["run_medians"].append(statistics.median(row["times"]))
            for other, key in ((row.get("baseline"), "paired"), (row.get("compare"), "compare_paired")):
                if other in times and len(times[other]) == len(row["times"]):
                    # baseline / case: the case's speed relative to the baseline; case / compared: time ratio
                    pairs = zip(times[other], row["times"], strict=True)
                    case[key] += [b / t for b, t in pairs] if key == "paired" else [t / b for b, t in pairs]
    return list(cases.values())


def rows(cases: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    by_label = {c["label"]: statistics.median(c["times"]) for c in cases}
    first = runs[0]
    engine = first.get("engine") or {}
    head = (f"{len(runs)} calls, commit {first.get('commit')}, {first['hardware']}, torch {first.get('torch')}"
            + (f", {engine.get('backend')} {engine.get('version')}" if engine else "")
            + f"; dates {', '.join(r.get('date', '?') for r in runs)}")
    lines = [f"Pooled over {head}.", "",
             "| transfer | median (per call) | vs baseline: medians / paired | other |", "| --- | --- | --- | --- |"]
    for case in cases:
        t = by_label[case["label"]]
        per_call = ", ".join(f"{m * 1e3:.2f}" for m in case["run_medians"])
        versus = other = ""
        base = case["baseline"]
        if base in by_label:
            versus = f"{by_label[base] / t:.0%} / {statistics.median(case['paired']):.0%} of {base}" \
                if case["paired"] else f"{by_label[base] / t:.0%} of {base}"
        if case["compare"] in by_label and case["compare_paired"]:
            other = f"{statistics.median(case['compare_paired']):.2f}x the time of {case['compare']} (paired)"
        lines.append(f"| {case['label']} | {t * 1e3:.2f} ms ({per_call}) | {versus} | {other} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON results of bench_weight_sync.py --json")
    args = parser.parse_args()
    runs = load(args.files)
    print("\n".join(rows(pool(runs), runs)))


if __name__ == "__main__":
    sys.exit(main())
