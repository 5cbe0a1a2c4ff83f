"""Where a module's plan spends its Python at every sync, part by part (a timing, not a test).

A trainer that calls ``sync_weights(engines, model, sender=...)`` has the model's tensors found and
planned at every step: the remembered state-dict walk checks the module's structure
(``module_tensors``), hands out detached tensors, and ``plan`` reads each tensor's address, dtype,
shape and contiguity. This times each part in a loop (warm CPU caches: inside a sync, with other work
between two calls, each costs more) for the shapes given, on CPU and, where there is one, on a GPU::

    python core/benchmarks/time_module_plan.py qwen2.5-1.5b qwen3-30b-a3b-6l

Run from a tree of an older commit (``PYTHONPATH=core/src``), the parts that commit lacks are left
out, so two commits can be compared on one machine (docs/benchmarks.md, "2026-12-06 (fifth session)").
"""

from __future__ import annotations

import operator
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_weight_sync import as_module, tensor_specs  # noqa: E402
from skyrl_backends.weight_sync import module_tensors as memo  # noqa: E402
from skyrl_backends.weight_sync.chunks import named_tensors, plan  # noqa: E402


def microseconds(work: Callable[[], object], repeats: int = 300) -> float:
    for _ in range(20):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def parts(shape: str, device: str) -> dict[str, float]:
    model = as_module({name: torch.empty(size, dtype=torch.bfloat16, device=device)
                       for name, size in tensor_specs(shape)})
    named_tensors(model)
    walk = memo._remembered[model]
    # The walk's live tensors (older commits kept them as pairs).
    tensors = walk.tensors if hasattr(walk, "tensors") else [tensor for _, tensor in walk.pairs]
    detached = [tensor.detach() for tensor in tensors]
    rows = {
        "tensors": len(tensors),
        "modules": 1 + len(walk.submodules),
        "plan(module)": microseconds(lambda: plan(model, 1 << 30)),
        "the module's tensors (named_tensors)": microseconds(lambda: named_tensors(model)),
        "the structure check": microseconds(lambda: walk.still_describes(model)),
        "detaching every tensor": microseconds(lambda: [tensor.detach() for tensor in tensors]),
        "is_set_to of every tensor": microseconds(lambda: all(map(torch.Tensor.is_set_to, detached, tensors))),
        "shape of every tensor": microseconds(lambda: list(map(operator.attrgetter("shape"), tensors))),
    }
    if hasattr(walk, "detached"):  # the kept detached tensors (5932dc2 on)
        rows["checking the kept detached tensors"] = microseconds(walk.detached)
    return rows


def main() -> None:
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for shape in sys.argv[1:] or ["qwen2.5-1.5b"]:
        for device in devices:
            found = parts(shape, device)
            print(f"{shape} on {device}: " + "; ".join(
                f"{name} {value:.0f}" + ("" if name in ("tensors", "modules") else " us")
                for name, value in found.items()), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
