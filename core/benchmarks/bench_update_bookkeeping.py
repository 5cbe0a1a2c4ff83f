"""The Python work of one colocated weight update, apart from moving bytes (not a test).

A colocated sync of a 1.5B model moves 3 GB that a GPU copies in 1.4-1.7 ms, and handles ~340
tensors one by one in Python on the way: the trainer plans the layout and writes the payload, the
request is built and crosses a process boundary, the engine validates the layout and makes a view
per tensor. This times those steps alone, for the tensor names and dtypes of a Qwen2.5 shape
(``--shape``) with every tensor cut to at most 8 elements a side, so the bytes cost nothing, over
shared memory (the steps CUDA IPC shares, but for its handles, run the same code).

Two cases, taking turns: **warm** (a kept sender and the engine's memo of the last layout: every
step of a training run after the first) and **cold** (a new sender and a forgotten memo: the first
update of a layout). Printed: the median milliseconds of each step in each case and the cold/warm
ratio. The last step applies the received views once more as an engine's replayed load does
(``weight_sync.replay``, what the vLLM and SGLang plugins run on a colocated update): warm, the
recorded copies replayed; cold, the load run and recorded (the memo of the views forgotten, the
views are new, so the recording does not stand for them). The request crosses the boundary as
JSON (``request_to_json``, what the HTTP server and the benchmarks' engine processes exchange) and
as a pickle (what a Ray actor call sends).

    python core/benchmarks/bench_update_bookkeeping.py --shape qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import datetime
import json
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_weight_sync import SHAPES, as_module, hardware, qwen2_specs  # noqa: E402
from skyrl_backends.testing.provenance import measured_commit  # noqa: E402
from skyrl_backends.types import WeightUpdateRequest  # noqa: E402
from skyrl_backends.weight_sync import (  # noqa: E402
    SharedMemorySender,
    load_named_tensors,
    receive_named_tensors,
    replay,
    shared_memory,
)
from skyrl_backends.weight_sync.chunks import named_tensors, plan  # noqa: E402
from skyrl_backends.weight_sync.manifest import request_from_json, request_to_json  # noqa: E402

STEPS = ("named_tensors(module)", "plan", "write", "request", "to JSON and back", "pickle and back",
         "receive and view", "replayed load")


def small_model(shape: str) -> torch.nn.Module:
    """A module with the shape's parameter names, each at most 8 elements a side."""
    return as_module({name: torch.zeros(tuple(min(d, 8) for d in dims), dtype=torch.bfloat16)
                      for name, dims in qwen2_specs(shape)})


def one_update(model: torch.nn.Module, sender: SharedMemorySender, params: dict[str, torch.Tensor],
               replayed: replay.ReplayedLoad, times: dict[str, list[float]]) -> None:
    def timed(step: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[step].append(time.perf_counter() - t0)
        return result

    pairs = timed("named_tensors(module)", lambda: named_tensors(model))
    layout = timed("plan", lambda: plan(pairs))
    payload = timed("write", lambda: sender.write(layout))
    request = timed("request", lambda: WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes,
                                                           sender.strategy, payload))
    timed("to JSON and back", lambda: request_from_json(json.loads(json.dumps(request_to_json(request)))))
    received = timed("pickle and back", lambda: pickle.loads(pickle.dumps(request)))

    def load(named: list[tuple[str, torch.Tensor]]) -> None:
        torch._foreach_copy_([params[name] for name, _ in named], [t for _, t in named])

    timed("receive and view", lambda: load_named_tensors(received, "cpu", load))
    views = list(receive_named_tensors(received, "cpu"))  # the same views again (the receiver's memo)

    def load_by_name(named: list[tuple[str, torch.Tensor]]) -> None:  # as a model's load_weights
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor)

    timed("replayed load", lambda: replayed.load(views, load_by_name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="write every timing here")
    args = parser.parse_args()
    model = small_model(args.shape)
    engine_model = small_model(args.shape).requires_grad_(False)  # the engine's parameters, in a module
    params = dict(engine_model.named_parameters())
    replayed = replay.ReplayedLoad(lambda: replay.parameters_and_buffers(engine_model))
    kept = SharedMemorySender()
    cases: dict[str, dict[str, list[float]]] = {case: {step: [] for step in STEPS} for case in ("warm", "cold")}
    try:
        one_update(model, kept, params, replayed, {step: [] for step in STEPS})  # the first: the memos fill
        for _ in range(args.repeats):
            one_update(model, kept, params, replayed, cases["warm"])
            shared_memory.forget_layout()
            with SharedMemorySender() as fresh:
                one_update(model, fresh, params, replayed, cases["cold"])
            shared_memory.forget_layout()
            one_update(model, kept, params, replayed, {step: [] for step in STEPS})  # warm again, untimed
    finally:
        kept.close()
    medians = {case: {step: statistics.median(ts) * 1e3 for step, ts in steps.items()} for case, steps in cases.items()}
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{hardware('cpu')} | torch {torch.__version__} | {date} | commit {measured_commit()}")
    print(f"{args.shape}: {len(params)} tensors, {args.repeats} updates per case, in turns; median ms")
    print(f"{'step':24}{'warm':>9}{'cold':>9}{'cold/warm':>11}")
    for step in STEPS:
        warm, cold = medians["warm"][step], medians["cold"][step]
        print(f"{step:24}{warm:>9.3f}{cold:>9.3f}{cold / warm:>11.2f}")
    for case in ("warm", "cold"):
        # JSON and pickle are two ways across; a request takes one of them
        total = sum(v for step, v in medians[case].items() if step != "pickle and back")
        print(f"{case}: {total:.3f} ms with the JSON crossing, "
              f"{total - medians[case]['to JSON and back'] + medians[case]['pickle and back']:.3f} ms with pickle")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": date, "commit": measured_commit(), "hardware": hardware("cpu"), "shape": args.shape,
                       "tensors": len(params), "medians_ms": medians, "times_s": cases}, f, indent=1)


if __name__ == "__main__":
    main()
