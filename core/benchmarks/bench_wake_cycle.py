"""The colocated RL step's memory cycle, through skyrl against the engine's own calls (not a test).

Issue 23's P4. Between two rollouts a colocated trainer puts the engine to sleep, trains, and then
brings it back: wake the weights' memory, sync the new weights into it, wake the KV cache, and
generate again. This benchmark runs that cycle on one real engine (vLLM or SGLang, GPU) in two ways,
taking turns, and times each phase and the whole cycle up to the first token:

    skyrl   Engine.sleep(level) -> Engine.wake_up(["weights"]) -> sync_weights(cuda_ipc, a sender
            that adopted the trainer's weights) -> Engine.wake_up(["kv_cache"]) -> Engine.generate
            (one token)
    own     the engine's own calls on the same engine object (engine_own_calls.py):
            vLLM: AsyncLLM.sleep(level) -> wake_up(tags=["weights"]) -> one CUDA IPC handle per
                  tensor through collective_rpc into the model's load_weights (what an RL worker
                  extension does) -> wake_up(tags=["kv_cache"]) -> AsyncLLM.generate (one token)
            SGLang: the tokenizer manager's release_memory_occupation -> resume_memory_occupation
                  (weights) -> update_weights_from_tensor -> resume_memory_occupation (kv_cache) ->
                  sglang.Engine.async_generate (one token)

The level is the one at which the engine discards its weights (vLLM 2, SGLang 1): the sync
overwrites them anyway, which is why RL trainers sleep that deep. Printed: per phase and for the
whole cycle, the median of each side and skyrl's time over the engine's (goal: the cycle <= 1.05x),
as a ratio of medians and paired (the median of each round's ratio; the two sides take turns).
``--json`` writes every timing with the commit, the hardware and the versions.

``--kv-wake-delay-ms MS`` waits MS (not timed) before the KV cache wakes, on both sides. On some
H100 hosts vLLM's KV-cache wake ends about 100 ms after the sleep began whatever ran in between, so
skyrl's cycle, whose sync is the shorter, waits longer in that phase (docs/benchmarks.md, P4): with
a delay that makes both sides reach the wake that late, the two wakes should take alike if the wait
is the time since the sleep, and not if it is state that skyrl's sync leaves behind.

    python core/benchmarks/bench_wake_cycle.py --engine vllm --shape qwen2.5-1.5b --json out.json
    python core/benchmarks/bench_wake_cycle.py pool call1/vllm-wake-cycle-*.json call2/vllm-wake-cycle-*.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_weight_sync import (  # noqa: E402  (the sibling benchmark's model and report helpers)
    SHAPES,
    commit,
    engine_version,
    hardware,
    paired,
    random_weights,
    write_model_folder,
)
from engine_own_calls import OwnCalls, own_calls  # noqa: E402
from pool_generate import load as load_runs  # noqa: E402  (one setting per pool)

PHASES = ("sleep", "wake_weights", "sync", "wake_kv_cache", "first_token")
UNTIL_KV_AWAKE = "sleep start to KV cache awake"  # a derived row of the pooled table
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
Phase = Callable[[], Awaitable[Any]]


def skyrl_cycle(engine: Any, weights: dict[str, torch.Tensor], level: int, bucket_bytes: int
                ) -> tuple[dict[str, Phase], Callable[[], None]]:
    """The cycle through the facade, syncing from a sender that adopted the trainer's weights (the
    trainer's parameters live in its buckets: nothing is packed). Returns the phases and a closer."""
    from skyrl_backends.weight_sync import make_sender, sync_weights

    sender = make_sender("cuda_ipc")
    adopted = sender.adopt(dict(weights), bucket_bytes)

    async def sync() -> None:
        await sync_weights(engine, adopted, "cuda_ipc", bucket_bytes=bucket_bytes, sender=sender)

    async def first_token() -> None:
        out = await engine.generate([PROMPT], {"max_tokens": 1, "temperature": 0.0})
        assert len(out.completions[0].token_ids) == 1

    phases = {
        "sleep": lambda: engine.sleep(level=level),
        "wake_weights": lambda: engine.wake_up(["weights"]),
        "sync": sync,
        "wake_kv_cache": lambda: engine.wake_up(["kv_cache"]),
        "first_token": first_token,
    }
    return phases, sender.close


def own_cycle(own: OwnCalls, weights: dict[str, torch.Tensor], level: int, flush_cache: bool) -> dict[str, Phase]:
    """The same cycle through the engine's own calls on the same engine object
    (:mod:`engine_own_calls`: vLLM's AsyncLLM, SGLang's tokenizer manager and sglang.Engine)."""
    named = list(weights.items())

    async def first_token() -> None:
        out = await own.generate([PROMPT], max_tokens=1, temperature=0.0)
        assert len(out[0].token_ids) == 1

    return {
        "sleep": lambda: own.sleep(level),
        "wake_weights": lambda: own.wake_up(["weights"]),
        "sync": lambda: own.sync(named, flush_cache),
        "wake_kv_cache": lambda: own.wake_up(["kv_cache"]),
        "first_token": first_token,
    }


async def run_cycle(phases: dict[str, Phase], kv_wake_delay_s: float = 0.0) -> dict[str, float]:
    """One cycle, each phase timed to the end of its GPU work; ``kv_wake_delay_s`` is waited, untimed,
    before the KV cache wakes (``--kv-wake-delay-ms``)."""
    times = {}
    for name in PHASES:
        if name == "wake_kv_cache" and kv_wake_delay_s:
            await asyncio.sleep(kv_wake_delay_s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        await phases[name]()
        torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
    times["cycle"] = sum(times[name] for name in PHASES)
    return times


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import skyrl_backends as sb

    weights = random_weights(args.shape, torch.bfloat16, "cuda")
    with tempfile.TemporaryDirectory() as folder:
        write_model_folder(args.shape, weights, folder)
        engine = sb.create_engine(args.engine, model=folder, dtype="bfloat16", max_model_len=2048,
                                  gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=True)
        close_sender = None
        try:
            level = engine.capabilities.discards_weights_at_level
            if level is None:
                raise SystemExit(f"{args.engine} declares no sleep level that discards weights here")
            ours, close_sender = skyrl_cycle(engine, weights, level, args.bucket_bytes)
            # vLLM's sleep has emptied its prefix cache already; SGLang's update flushes it by default.
            own = own_cycle(own_calls(args.engine, engine.impl), weights, level, flush_cache=args.engine == "sglang")
            sides = {"skyrl": ours, "own": own}
            rounds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for i in range(args.warmup + args.repeats):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))  # alternate who goes first
                for side in order:
                    times = await run_cycle(sides[side], args.kv_wake_delay_ms / 1e3)
                    if i >= args.warmup:
                        rounds[side].append(times)
                print(f"round {i + 1}/{args.warmup + args.repeats}"
                      f"{' (warm-up)' if i < args.warmup else ''}: "
                      + ", ".join(f"{s} {rounds[s][-1]['cycle'] * 1e3:.1f} ms" for s in sides if rounds[s]
                                  and i >= args.warmup), flush=True)
            return {"rounds": rounds, "level": level, "version": engine_version(args.engine)}
        finally:
            if close_sender is not None:
                close_sender()
            await engine.teardown()


def report(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    print(f"\n{args.engine} {result['version']}, {args.shape}, sleep level {result['level']}, "
          f"{args.repeats} rounds; milliseconds, median")
    print(f"{'phase':<16}{'skyrl':>10}{'own':>10}{'skyrl/own (medians)':>22}{'paired':>10}")
    for name in (*PHASES, "cycle"):
        ours = [r[name] for r in result["rounds"]["skyrl"]]
        own = [r[name] for r in result["rounds"]["own"]]
        ratio = statistics.median(ours) / statistics.median(own)
        pair = paired(ours, own)  # the median of each round's skyrl / own
        pair_ratio = pair if pair is not None else float("nan")
        rows.append({"phase": name, "skyrl": ours, "own": own})
        print(f"{name:<16}{statistics.median(ours) * 1e3:>10.2f}{statistics.median(own) * 1e3:>10.2f}"
              f"{ratio:>22.3f}{pair_ratio:>10.3f}")
    print("goal (issue 23, P4): the cycle through skyrl <= 1.05x the engine's own calls")
    return rows


def pool(paths: list[str]) -> None:
    """Pool ``--json`` results of several machine calls (one commit, engine and shape): per phase,
    the medians over every round of every call, the per-call medians, and the paired ratio over all
    rounds."""
    runs = load_runs(paths, same=("commit", "engine", "engine_version", "shape", "level"))
    if len({run.get("kv_wake_delay_ms", 0) for run in runs}) > 1:  # absent: a run from before the option
        raise SystemExit("the runs differ in kv_wake_delay_ms: pool runs of one setting only")
    first = runs[0]
    delay = first.get("kv_wake_delay_ms", 0)
    delayed = f", the KV cache woken {delay:g} ms later (untimed)" if delay else ""
    print(f"{first['engine']} {first['engine_version']}, {first['shape']}, sleep level {first['level']}, "
          f"commit {first['commit']}, {len(runs)} calls{delayed}; milliseconds")
    print("| phase | skyrl: median (per call) | own: median (per call) | skyrl / own: medians / paired |")
    print("| --- | --- | --- | --- |")
    for name in (*PHASES, "cycle", UNTIL_KV_AWAKE):
        rows = [phase_rows(run, name) for run in runs]
        ours = [t for r in rows for t in r["skyrl"]]
        own = [t for r in rows for t in r["own"]]
        per_call = [(statistics.median(r["skyrl"]) * 1e3, statistics.median(r["own"]) * 1e3) for r in rows]
        label = f"**{name}**" if name == "cycle" else name
        print(f"| {label} | {statistics.median(ours) * 1e3:.1f} ({', '.join(f'{a:.1f}' for a, _ in per_call)}) | "
              f"{statistics.median(own) * 1e3:.1f} ({', '.join(f'{b:.1f}' for _, b in per_call)}) | "
              f"{statistics.median(ours) / statistics.median(own):.3f} / {paired(ours, own):.3f} |")


def phase_rows(run: dict[str, Any], name: str) -> dict[str, list[float]]:
    """One run's times of a phase per side, round by round; ``UNTIL_KV_AWAKE`` is derived: the time
    from the start of the sleep to the end of the KV cache's wake (the delay excluded), which is what
    a wake that waits for the sleep to settle keeps constant."""
    by_phase = {row["phase"]: row for row in run["rows"]}
    if name != UNTIL_KV_AWAKE:
        return by_phase[name]
    upto = PHASES[:PHASES.index("wake_kv_cache") + 1]
    return {side: [sum(times) for times in zip(*(by_phase[p][side] for p in upto), strict=True)]
            for side in ("skyrl", "own")}


def main() -> None:
    if sys.argv[1:2] == ["pool"]:
        pool(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("vllm", "sglang"), required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-bytes", type=int, default=1 << 30)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--json", help="write every timing here")
    parser.add_argument("--kv-wake-delay-ms", type=float, default=0.0,
                        help="wait this long (untimed) before the KV cache wakes, on both sides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_wake_cycle needs a GPU: sleep and wake are GPU memory operations")
    result = asyncio.run(bench(args))
    rows = report(result, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "wake_cycle", "engine": args.engine, "engine_version": result["version"],
                       "shape": args.shape, "level": result["level"], "kv_wake_delay_ms": args.kv_wake_delay_ms,
                       "commit": commit(),
                       "hardware": hardware("gpu"), "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
