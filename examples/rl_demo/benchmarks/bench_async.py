"""Asynchronous vs synchronous RL: steps per second at equal reward (a benchmark, not a test).

Runs the demo's training loop with the same seed and configuration twice per repeat, synchronously
(generate, then train, then sync) and asynchronously (step t+1 generated while step t trains, at most
one version of staleness), alternating the order between repeats so drift on a shared machine hits
both alike. Both runs are measured in the same process, so the ratio is against a baseline of the
same moment. Prints, per schedule, steps/s (median over repeats) and the mean reward of the last
window of steps: the speed-up counts only if the rewards agree.

    python examples/rl_demo/benchmarks/bench_async.py --model .cache/tiny-model --steps 60 --repeats 3
    python examples/rl_demo/benchmarks/bench_async.py --backend vllm --model DIR --trainer-device cuda \\
        --engine-option gpu_memory_utilization=0.3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from skyrl_rl_demo.cli import _engine_option
from skyrl_rl_demo.metrics import WINDOW, summarize
from skyrl_rl_demo.trainer import RLTrainer, TrainerConfig


async def _train(config: TrainerConfig) -> dict[str, Any]:
    """The demo's loop without its files (no plot: matplotlib need not be installed)."""
    trainer = RLTrainer(config)
    rows = []
    try:
        started = time.perf_counter()
        for step in range(1, config.steps + 1):
            rows.append(await trainer.train_step(step))
        loop_s = time.perf_counter() - started
    finally:
        await trainer.close()
    return {**summarize(rows), "steps_per_s": len(rows) / loop_s}


def _run(base: TrainerConfig, async_rollouts: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-async-") as out:
        config = TrainerConfig(**{**base.__dict__, "async_rollouts": async_rollouts, "out_dir": out})
        summary = asyncio.run(_train(config))
    return {"steps_per_s": summary["steps_per_s"], "reward_last": summary["reward_last"],
            "reward_first": summary["reward_first"], "generation_s_mean": summary.get("generation_s_mean"),
            "update_s_mean": summary.get("update_s_mean"), "step_s_mean": summary.get("step_s_mean"),
            "stale_token_fraction_mean": summary.get("stale_token_fraction_mean")}


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="transformers")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-generate-length", type=int, default=1)
    p.add_argument("--trainer-device", default="cpu")
    p.add_argument("--weight-sync", default="auto")
    p.add_argument("--engine-option", type=_engine_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = TrainerConfig(model=args.model, backend=args.backend, steps=args.steps, seed=args.seed,
                         prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         max_generate_length=args.max_generate_length, colocate=False,
                         trainer_device=args.trainer_device, weight_sync=args.weight_sync,
                         engine_options=dict(args.engine_option))
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    started = time.time()
    for repeat in range(args.repeats):
        order = ("sync", "async") if repeat % 2 == 0 else ("async", "sync")
        for schedule in order:
            result = _run(base, async_rollouts=schedule == "async")
            runs[schedule].append(result)
            print(f"repeat {repeat + 1} {schedule:5}: {result['steps_per_s']:.3f} steps/s, reward last "
                  f"{WINDOW} steps {result['reward_last']:.3f}", flush=True)
    figures = {schedule: {"steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                          "reward_last": statistics.mean(r["reward_last"] for r in rs)}
               for schedule, rs in runs.items()}
    ratio = figures["async"]["steps_per_s"] / figures["sync"]["steps_per_s"]
    print(f"\n{args.backend}, {args.steps} steps x {args.repeats} repeats (seed {args.seed}), trainer on "
          f"{args.trainer_device}:")
    for schedule, f in figures.items():
        print(f"  {schedule:5}: {f['steps_per_s']:.3f} steps/s (median), reward last {WINDOW} steps "
              f"{f['reward_last']:.3f} (mean)")
    print(f"  async / sync: {ratio:.2f}x")
    result = {"backend": args.backend, "steps": args.steps, "repeats": args.repeats, "seed": args.seed,
              "trainer_device": args.trainer_device, "figures": figures, "ratio": ratio, "runs": runs,
              "hardware": _hardware(), "date_utc": time.strftime("%Y-%m-%d", time.gmtime(started))}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
