"""Ways to apply one colocated update: copy every tensor out of the received buckets into the
engine's parameters (issue 23, P2; a benchmark, not a test).

An engine that received a packed update holds each tensor as a view into a bucket and must copy it
into its own parameter. The replayed load (``skyrl_backends.weight_sync.replay``) and the GPU
benchmark's engine process queued those copies as one ``torch._foreach_copy_`` until
``chunks.copy_all`` split them by size; on an H100 that fused apply took 3.0 ms against a 2.2 ms
copy of the same bytes in one piece. This times, in turns, for the parameters of a Qwen2.5 shape
(or a Qwen3 MoE one, ``qwen3-30b-a3b-6l``: 2,361 tensors) in separate allocations (as an engine
holds them):

    floor      one copy of all the bytes between two buffers (nothing per tensor)
    foreach    ``torch._foreach_copy_`` over every (parameter, view) pair
    per_tensor one ``Tensor.copy_`` per pair, queued on the stream
    split      ``chunks.copy_all``: ``copy_`` for the tensors of at least ``--split-bytes``, one
               ``_foreach_copy_`` for the rest (what the senders' pack does)
    plan       the same copies as a ``chunks.CopyPlan`` made once, run from Python
    streamsN   that plan with its large copies spread over N CUDA streams (GPU only)
    graph      that plan captured once in a CUDA graph and replayed (GPU only)
    graph_streamsN  both: the graph of the plan on N streams (GPU only; N=4: the replayed load's way)

Printed: the median milliseconds of each, and each against the floor and against ``foreach``
(medians; paired, the median of the rounds' ratios).

    python core/benchmarks/bench_apply_copy.py --shape qwen2.5-1.5b            # GPU
    python core/benchmarks/bench_apply_copy.py --shape qwen2.5-0.5b --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_weight_sync import APPLY_WAYS, MOE_SHAPES, SHAPES, hardware, paired, sync, tensor_specs  # noqa: E402
from skyrl_backends.testing.provenance import measured_commit  # noqa: E402
from skyrl_backends.weight_sync.chunks import COPY_ALONE_BYTES, CopyPlan, copy_all, plan, unpack  # noqa: E402


def received_views(shape: str, dtype: torch.dtype, device: str, bucket_bytes: int
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The engine's parameters (separate allocations) and the views into packed buckets that an
    update delivers for them, in the same order; and one buffer of all the buckets' bytes."""
    specs = tensor_specs(shape)
    params = {name: torch.zeros(s, dtype=dtype, device=device) for name, s in specs}
    layout = plan(params, bucket_bytes)
    total = sum(b.nbytes for b in layout.buckets)
    storage = torch.zeros(total, dtype=torch.uint8, device=device)
    views: dict[str, torch.Tensor] = {}
    start = 0
    for manifest in layout.buckets:
        views.update(unpack(manifest, storage[start:start + manifest.nbytes]))
        start += manifest.nbytes
    # Values, not random bytes: random bytes read as floats hold NaNs, and a copy kernel that goes
    # through float registers (the fused copy) may rewrite a NaN's payload bits, which no weight has.
    for v in views.values():
        v.normal_()
    names = list(params)
    return [params[n] for n in names], [views[n] for n in names], storage


def cases(destinations: list[torch.Tensor], origins: list[torch.Tensor], storage: torch.Tensor,
          split_bytes: int) -> dict[str, Callable[[], None]]:
    floor_target = torch.empty_like(storage)

    def floor() -> None:
        floor_target.copy_(storage, non_blocking=True)

    def foreach() -> None:
        torch._foreach_copy_(destinations, origins, non_blocking=True)

    def per_tensor() -> None:
        for destination, origin in zip(destinations, origins, strict=True):
            destination.copy_(origin, non_blocking=True)

    def split() -> None:  # what the senders' pack does
        copy_all(destinations, origins, split_bytes)

    ways = {"floor": floor, "foreach": foreach, "per_tensor": per_tensor, "split": split,
            "plan": CopyPlan(destinations, origins, split_bytes).run}
    if storage.is_cuda:  # the ways a GPU queues the plan's copies (CopyPlan's options), as the sync benchmark's
        ways.update({name: CopyPlan(destinations, origins, split_bytes, **options).run
                     for name, options in APPLY_WAYS.items() if name.startswith(("streams", "graph"))})
    return ways


def run(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    destinations, origins, storage = received_views(args.shape, dtype, args.device, args.bucket_bytes)
    fns = cases(destinations, origins, storage, args.split_bytes)
    with torch.no_grad():
        for fn in fns.values():  # warm-up, and each way must copy the same values
            for _ in range(args.warmup):
                fn()
        for name in [n for n in fns if n != "floor"]:
            for d in destinations:
                d.zero_()
            fns[name]()
            sync(args.device)
            if not all(torch.equal(d.reshape(-1).view(torch.uint8), o.reshape(-1).view(torch.uint8))
                       for d, o in zip(destinations, origins, strict=True)):
                raise AssertionError(f"{name} did not copy every tensor")
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):  # in turns
            for name, fn in fns.items():
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
    return {"benchmark": "apply_copy", "shape": args.shape, "dtype": args.dtype, "device": args.device,
            "ntensors": len(origins), "nbytes": int(storage.numel()), "split_bytes": args.split_bytes,
            "commit": measured_commit(), "hardware": hardware("gpu" if args.device.startswith("cuda") else "cpu"),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "times_s": times}


def ratios(times: list[float], base: list[float]) -> tuple[float, float]:
    """Against ``base``: the ratio of medians and the median of the rounds' ratios."""
    return statistics.median(times) / statistics.median(base), paired(times, base)


def report(result: dict) -> None:
    times = result["times_s"]
    print(f"# apply of one update, {result['shape']} ({result['ntensors']} tensors, {result['nbytes'] / 1e9:.3f} GB "
          f"{result['dtype']}), {result['device']}; {result['hardware']}; torch {result['torch']}; "
          f"commit {result['commit']}; {result['date']}; {len(times['floor'])} rounds in turns")
    print(f"{'way':<16}{'median ms':>10}{'vs floor (medians / paired)':>30}{'vs foreach (medians / paired)':>32}")
    for name, ts in times.items():
        floor = ratios(ts, times["floor"])
        foreach = ratios(ts, times["foreach"])
        print(f"{name:<16}{statistics.median(ts) * 1e3:>10.3f}{f'{floor[0]:.3f} / {floor[1]:.3f}':>30}"
              f"{f'{foreach[0]:.3f} / {foreach[1]:.3f}':>32}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES | MOE_SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bucket-bytes", type=int, default=1 << 30)
    parser.add_argument("--split-bytes", type=int, default=COPY_ALONE_BYTES,
                        help="tensors of at least this many bytes get their own copy in the 'split' way "
                             "(default: chunks.COPY_ALONE_BYTES, what the replayed load uses)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write every timing here")
    args = parser.parse_args()
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
