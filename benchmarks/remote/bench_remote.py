"""Remote engines: what crossing the wire costs, against baselines measured in the same run (not a test).

Three measurements, one subcommand each:

``generate``
    64 concurrent requests to a remote engine (a ``skyrl-backends serve`` process on loopback,
    driven by ``RemoteEngine``) against the same engine configuration in this process. Rounds
    alternate (in process, remote, in process, ...) so that load on the machine hits both alike;
    the ratio is remote tokens/s over in-process tokens/s, median of the rounds (target >= 0.95).
``weight-sync``
    A full update of a Qwen2.5-shaped model into a remote transformers engine over a gloo broadcast
    (``connect_broadcast`` + ``sync_weights`` through the engine API: the manifest over HTTP, the
    bytes over gloo, the engine loading every tensor) against a raw ``torch.distributed`` gloo
    broadcast of the same tensors into a bare receiving process (target >= 0.9 of the raw speed).
``recovery``
    Two engines on a simulated Ray cluster of three nodes; one node is removed under load. Printed:
    seconds until every in-flight request completed elsewhere, until the lost engine was restarted
    on a live node, until it held the current weights (a gloo broadcast of its own), and until it
    served its first request back in rotation.

Examples::

    python benchmarks/remote/bench_remote.py generate --model .cache/tiny-model --rounds 7
    python benchmarks/remote/bench_remote.py weight-sync --shape qwen2.5-0.5b --repeats 7
    python benchmarks/remote/bench_remote.py recovery --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def header(title: str) -> None:
    from skyrl_backends.testing.hardware import cpu_model

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    load = os.getloadavg()[0]
    print(f"# {title}\n# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores), Python {platform.python_version()}, "
          f"load average {load:.1f}")


# -- generate -----------------------------------------------------------------------------------------
async def _burst(engine: Any, prompts: list[list[int]], params: dict[str, Any]) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate([p], params) for p in prompts))
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o[0].token_ids) for o in outs)


def bench_generate(args: argparse.Namespace) -> None:
    import skyrl_backends as sb
    from skyrl_backends.remote import launch_engine

    header(f"remote generate vs in process: {args.requests} concurrent requests, backend {args.backend}")
    options = dict(dtype=args.dtype, device="cpu", **({"max_model_len": 1024} if args.backend == "vllm" else {}))
    prompts = [[10 + (i * 7 + j * 3) % 400 for j in range(args.prompt_len)] for i in range(args.requests)]
    params = {"max_generate_length": args.max_tokens, "temperature": 0.0, "ignore_eos": True}

    async def main() -> None:
        local = sb.create_engine(args.backend, model=args.model, **options)
        remote = launch_engine(args.backend, args.model, **options)
        rows: list[tuple[float, float]] = []
        try:
            for engine in (local, remote):  # warm-up: first-call costs out of the rounds
                await _burst(engine, prompts[:8], params)
            for round_ in range(args.rounds):
                order = [(local, "local"), (remote, "remote")] if round_ % 2 == 0 else [(remote, "remote"),
                                                                                      (local, "local")]
                result = {}
                for engine, label in order:
                    elapsed, tokens = await _burst(engine, prompts, params)
                    result[label] = tokens / elapsed
                rows.append((result["local"], result["remote"]))
                print(f"round {round_ + 1}: in process {result['local']:8.1f} tok/s, remote {result['remote']:8.1f} "
                      f"tok/s, ratio {result['remote'] / result['local']:.3f}", flush=True)
        finally:
            await remote.teardown()
            await local.teardown()
        ratios = [r / lo for lo, r in rows]
        print(f"median in process {statistics.median(lo for lo, _ in rows):.1f} tok/s, remote "
              f"{statistics.median(r for _, r in rows):.1f} tok/s; ratio median {statistics.median(ratios):.3f} "
              f"(per round {', '.join(f'{x:.3f}' for x in ratios)})")

    asyncio.run(main())


# -- weight sync --------------------------------------------------------------------------------------------
def bench_weight_sync(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "core" / "benchmarks"))
    import bench_weight_sync as base
    from skyrl_backends.remote import launch_engine
    from skyrl_backends.weight_sync import connect_broadcast, sync_weights

    torch.set_num_threads(args.threads)
    header(f"weight sync into a remote engine over gloo vs raw gloo, {args.shape}, apply={args.apply}")
    weights = base.random_weights(args.shape, torch.bfloat16, "cpu")
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    folder = tempfile.mkdtemp(prefix="skyrl-bench-model-")
    base.write_model_folder(args.shape, weights, folder)
    bare = base.EngineProcess(args.shape, "bfloat16", "cpu", args.threads)
    raw = base.raw_broadcast_case(bare, weights, "gloo", "cpu", "raw gloo broadcast, per tensor")

    async def main() -> None:
        remote = launch_engine("transformers", folder, dtype="bfloat16", device="cpu",
                               env={"OMP_NUM_THREADS": str(args.threads)})
        sender = await connect_broadcast(remote, backend="gloo", timeout_s=600, apply=args.apply,
                                         layout=args.layout)
        times: dict[str, list[float]] = {"raw": [], "remote": []}
        try:
            for repeat in range(args.warmup + args.repeats):
                for label in ("raw", "remote") if repeat % 2 == 0 else ("remote", "raw"):
                    t0 = time.perf_counter()
                    if label == "raw":
                        await asyncio.to_thread(raw.run)
                    else:
                        await sync_weights(remote, weights, "broadcast", sender=sender,
                                           bucket_bytes=args.bucket_mib << 20)
                    if repeat >= args.warmup:
                        times[label].append(time.perf_counter() - t0)
            versions = (await remote.refresh()).weight_version
        finally:
            sender.close()
            await remote.teardown()
        raw_s, remote_s = statistics.median(times["raw"]), statistics.median(times["remote"])
        print(f"{len(weights)} tensors, {nbytes / 1e9:.3f} GB bfloat16; {args.repeats} repeats "
              f"(+{args.warmup} warm-up), engine at weight version {versions}")
        print(f"raw gloo broadcast, per tensor: median {raw_s * 1e3:.1f} ms ({nbytes / raw_s / 1e9:.2f} GB/s); "
              f"runs {', '.join(f'{t * 1e3:.0f}' for t in times['raw'])}")
        print(f"remote engine, {sender.layout} {args.apply}: median {remote_s * 1e3:.1f} ms "
              f"({nbytes / remote_s / 1e9:.2f} GB/s); runs {', '.join(f'{t * 1e3:.0f}' for t in times['remote'])}")
        print(f"ratio (raw time / remote time): {raw_s / remote_s:.3f}")

    try:
        asyncio.run(main())
    finally:
        bare.stop()


# -- recovery --------------------------------------------------------------------------------------------
def bench_recovery(args: argparse.Namespace) -> None:
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from skyrl_backends.client import EngineRecovery, InferenceEngineClient
    from skyrl_backends.ray_wrapper import create_ray_engines, restart_ray_engine
    from skyrl_backends.weight_sync import connect_broadcast, sync_weights
    from transformers import AutoModelForCausalLM

    header("recovery after losing a node (simulated Ray cluster: 3 one-CPU nodes, 2 engines)")
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4}})
    nodes = [sim.add_node(num_cpus=1, include_dashboard=False) for _ in range(3)]
    sim.wait_for_nodes()
    ray.init(address=sim.address, log_to_driver=False, configure_logging=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    current = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in model.state_dict().items()}
    prompts = [[5 + i, 17, 3 * i + 1, 90] for i in range(8)]
    params = {"max_generate_length": args.max_tokens, "temperature": 0.0, "ignore_eos": True}

    async def main() -> None:
        engines = create_ray_engines(2, "transformers", args.model, num_cpus_per_engine=1,
                                     placement_strategy="STRICT_SPREAD", start_timeout_s=600, dtype="float32")
        client = InferenceEngineClient(engines, max_failovers=3)
        victim_id = client.engine_ids[1]
        sender = await connect_broadcast(client, backend="gloo", timeout_s=120, group_name="step")
        await sync_weights(client, current, "broadcast", sender=sender)
        sender.close()
        expected = (await client.generate(prompts, params)).response_ids
        tasks = [asyncio.ensure_future(client.generate([p], params)) for p in prompts]
        while client.health()[victim_id]["inflight"] == 0:
            await asyncio.sleep(0.01)
        node = next(n for n in nodes if n.node_id == engines[1].node_id)
        t_loss = time.perf_counter()
        await asyncio.to_thread(sim.remove_node, node, False)
        outs = await asyncio.gather(*tasks)
        t_served = time.perf_counter()
        marks: dict[str, float] = {}

        async def restart(_engine_id: str, lost: Any) -> Any:
            engine = await asyncio.to_thread(restart_ray_engine, lost, start_timeout_s=600)
            marks["restarted"] = time.perf_counter()
            return engine

        async def restore(engine: Any) -> None:
            group = await connect_broadcast(engine, backend="gloo", timeout_s=120, group_name="restore")
            await sync_weights(engine, current, "broadcast", sender=group)
            group.close()
            marks["restored"] = time.perf_counter()

        await EngineRecovery(client, restart, restore).recover()
        first = await client.engine(victim_id).generate(prompts[:1], params)
        t_back = time.perf_counter()
        assert [o[0].token_ids for o in outs] == expected and first.response_ids == expected[:1]
        print(f"in-flight requests all completed on the surviving engine: {t_served - t_loss:6.2f} s after the loss")
        print(f"lost engine restarted on a live node:                     {marks['restarted'] - t_loss:6.2f} s")
        print(f"restarted engine holds the current weights:               {marks['restored'] - t_loss:6.2f} s")
        print(f"restarted engine served its first request:                {t_back - t_loss:6.2f} s")
        await client.teardown()

    try:
        asyncio.run(main())
    finally:
        ray.shutdown()
        sim.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--model", default=os.environ.get("SKYRL_TEST_MODEL", ".cache/tiny-model"))
    gen.add_argument("--backend", default="transformers")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--requests", type=int, default=64)
    gen.add_argument("--prompt-len", type=int, default=32)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--rounds", type=int, default=7)
    gen.set_defaults(func=bench_generate)
    ws = sub.add_parser("weight-sync")
    ws.add_argument("--shape", default="qwen2.5-0.5b")
    ws.add_argument("--apply", default="streamed", choices=["atomic", "streamed"])
    ws.add_argument("--layout", default="packed", choices=["packed", "per_tensor"])
    ws.add_argument("--bucket-mib", type=int, default=256)
    ws.add_argument("--repeats", type=int, default=7)
    ws.add_argument("--warmup", type=int, default=1)
    ws.add_argument("--threads", type=int, default=1)
    ws.set_defaults(func=bench_weight_sync)
    rec = sub.add_parser("recovery")
    rec.add_argument("--model", default=os.environ.get("SKYRL_TEST_MODEL", ".cache/tiny-model"))
    rec.add_argument("--max-tokens", type=int, default=48)
    rec.set_defaults(func=bench_recovery)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
