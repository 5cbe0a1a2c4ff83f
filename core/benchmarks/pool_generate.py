"""Pool the JSON results of several generation benchmarks (``plugins/*/benchmarks/bench_generate.py
--output``, one per machine call) into one row for docs/benchmarks.md: the median throughput of each
side over every timed run of every call, their ratio, and the paired ratio (each plugin run against
the engine's own run just before it) pooled over all runs, with each call's own figures beside them.
Runs that differ in commit, engine version, model, shape of the workload or engine options are
refused: pool like with like (eager and CUDA-graph runs are two rows). Runs at two commits whose
difference changed no measured code may be pooled with ``--commits-alike A,B``: the files that differ
between them (``git diff --name-only``) are printed with the row, for the reader to judge.

    python core/benchmarks/pool_generate.py out/call1/vllm-generate-*.json out/call2/vllm-generate-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from typing import Any

# What must agree between the runs pooled into one row.
SAME = ("commit", "vllm", "sglang", "model", "dtype", "prompts", "prompt_len", "max_tokens", "logprobs",
        "engine_kwargs", "plugin_text")


def load(paths: list[str], same: tuple[str, ...] = SAME, commits_alike: set[str] = frozenset()
         ) -> list[dict[str, Any]]:
    """The result files, refused unless every run agrees on each key of ``same`` (a commit among
    ``commits_alike`` counts as any other of them)."""
    runs = [json.load(open(p)) for p in paths]
    if not runs:
        raise SystemExit("no result files given")
    for key in same:
        values = {json.dumps("alike" if key == "commit" and r.get(key) in commits_alike else r.get(key),
                             sort_keys=True) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"the runs differ in {key} ({sorted(values)}): pool runs of one setting only")
    return runs


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    native = [x for r in runs for x in r["native_tok_s"]]
    plugin = [x for r in runs for x in r["plugin_tok_s"]]
    pairs = [p / n for r in runs for p, n in zip(r["plugin_tok_s"], r["native_tok_s"], strict=True)]
    return {
        "calls": len(runs), "runs": len(pairs),
        "native_median": statistics.median(native), "plugin_median": statistics.median(plugin),
        "ratio_of_medians": statistics.median(plugin) / statistics.median(native),
        "paired_median": statistics.median(pairs),
        "per_call": [(r.get("date"), statistics.median(r["native_tok_s"]), statistics.median(r["plugin_tok_s"]))
                     for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--commits-alike", default="",
                        help="A,B: pool runs of these commits as one (their differing files are printed)")
    args = parser.parse_args()
    alike = [c for c in args.commits_alike.split(",") if c]
    if len(alike) not in (0, 2):  # the printed difference is of exactly these two
        raise SystemExit("--commits-alike takes two commits: A,B")
    runs = load(args.files, commits_alike=set(alike))
    pooled = pool(runs)
    first = runs[0]
    engine = "vllm" if "vllm" in first else "sglang"
    commits = sorted({str(r.get("commit")) for r in runs})
    if len(commits) > 1:
        changed = subprocess.run(["git", "diff", "--name-only", *alike], capture_output=True,
                                 text=True, check=True).stdout.split()
        print(f"commits {', '.join(commits)} pooled as one; files that differ: {', '.join(changed) or 'none'}")
    print(f"{engine} {first[engine]}, commit {'/'.join(commits)}, {first['model']} ({first['dtype']}), "
          f"{first['prompts']} prompts x {first['prompt_len']} -> {first['max_tokens']} tokens, "
          f"engine options {json.dumps(first['engine_kwargs'])}; {pooled['calls']} calls, {pooled['runs']} runs")
    print("| side | median tok/s (per call) | plugin / own: medians / paired |")
    print("| --- | --- | --- |")
    per_call = pooled["per_call"]
    own_calls = ", ".join(f"{n:.0f}" for _, n, _ in per_call)
    plugin_calls = ", ".join(f"{p:.0f}" for _, _, p in per_call)
    print(f"| engine's own API | {pooled['native_median']:.0f} ({own_calls}) | |")
    print(f"| skyrl plugin | {pooled['plugin_median']:.0f} ({plugin_calls}) | "
          f"{pooled['ratio_of_medians']:.3f} / {pooled['paired_median']:.3f} |")


if __name__ == "__main__":
    main()
