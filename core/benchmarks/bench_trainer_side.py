"""The trainer's side of weight sync, measured against baselines in the same run (not a test).

``--part sharded``: a model of Qwen2.5 shape with random weights, sharded with FSDP2 over two trainer
ranks (``fully_shard``; gloo on CPU, NCCL on GPU), synced into an engine process, against the same
model unsharded in one rank, same strategy, cases taking turns. The engine process copies every
received tensor into its own parameters (what a backend's load does) and acknowledges; its
parameters are checked against the trainer's at the end. Printed: median seconds and
``unsharded / sharded`` (1.0 = as fast; the goal is >= 0.9).

``--part lora``: a LoRA-only sync (``sync_lora_adapter``) against a full sync of the same model
(``sync_weights``), same strategy, into a real engine of ``--backend`` (transformers by default) in
this process, started on a checkpoint of that shape. Printed: median seconds and ``full / LoRA``.

Examples::

    python core/benchmarks/bench_trainer_side.py --part sharded --shape qwen2.5-0.5b
    python core/benchmarks/bench_trainer_side.py --part lora --shape qwen2.5-0.5b --lora-rank 16
    python core/benchmarks/bench_trainer_side.py --part sharded --device cuda   # 2 GPUs: cuda_ipc, NCCL

The sharded part's engine and the trainer exchange JSON over a pipe; the bytes move by the strategy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_weight_sync import SHAPES, hardware, qwen2_specs, write_model_folder  # noqa: E402
from skyrl_backends.types import TensorSpec, WeightSyncInitInfo, WeightUpdateRequest  # noqa: E402
from skyrl_backends.weight_sync.manifest import request_from_json, request_to_json  # noqa: E402


# -- the engine process (sharded part) -----------------------------------------------------------
def engine_main(conn: Any, shape: str, dtype_name: str, device: str) -> None:
    """Holds parameters of the model's shape; receives updates and copies them in (like load_weights)."""
    from skyrl_backends.weight_sync import load_named_tensors, make_receiver

    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = getattr(torch, dtype_name)
    params = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in qwen2_specs(shape)}
    communicators: dict[str, Any] = {}
    conn.send_bytes(b"{}")
    while True:
        msg = json.loads(conn.recv_bytes())
        reply: dict[str, Any] = {"ok": None}
        try:
            if msg["op"] == "stop":
                conn.send_bytes(json.dumps(reply).encode())
                return
            if msg["op"] == "specs":
                reply["ok"] = [[n, list(t.shape), dtype_name] for n, t in params.items()]
            elif msg["op"] == "init":
                info = WeightSyncInitInfo(**msg["init_info"])
                communicators[info.group_name] = make_receiver(info, device)
            elif msg["op"] == "update":
                request = request_from_json(msg["request"])
                group = request.payload.get("group_name") if isinstance(request.payload, dict) else None

                def load(named: list[tuple[str, torch.Tensor]]) -> None:
                    with torch.no_grad():
                        torch._foreach_copy_([params[n] for n, _ in named], [t for _, t in named], non_blocking=True)

                load_named_tensors(request, device, load, communicator=communicators.get(group))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            elif msg["op"] == "digest":
                reply["ok"] = [float(params[n].float().sum()) for n in sorted(params)]
        except Exception as exc:  # reported to the trainer
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send_bytes(json.dumps(reply).encode())


class PipeEngine:
    """The trainer's handle on the engine process: the methods sync_weights and connect_broadcast call."""

    backend = "bench"

    def __init__(self, shape: str, dtype: str, device: str) -> None:
        from skyrl_backends.capabilities import Capabilities

        self.capabilities = Capabilities()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, args=(child, shape, dtype, device), daemon=True)
        self.process.start()
        self.conn.recv_bytes()
        self.version = 0
        self._specs: dict[str, TensorSpec] | None = None

    def _call(self, **msg: Any) -> Any:
        self.conn.send_bytes(json.dumps(msg).encode())
        reply = json.loads(self.conn.recv_bytes())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    async def weight_specs(self) -> dict[str, TensorSpec]:
        if self._specs is None:
            self._specs = {n: TensorSpec(n, tuple(s), d) for n, s, d in await asyncio.to_thread(self._call, op="specs")}
        return self._specs

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        specs = await self.weight_specs()
        bad = [n for n, s, d in zip(request.names, request.shapes, request.dtypes, strict=True)
               if n not in specs or specs[n].shape != tuple(s) or specs[n].dtype != d]
        if bad:
            raise RuntimeError(f"the engine refuses {bad[:3]}")

    async def init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        await asyncio.to_thread(self._call, op="init", init_info=init_info.__dict__)

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        await asyncio.to_thread(self._call, op="update", request=request_to_json(request))
        self.version += 1
        return self.version

    def digest(self) -> list[float]:
        return self._call(op="digest")

    def stop(self) -> None:
        self._call(op="stop")
        self.process.join(30)


# -- the sharded part: one process per trainer rank ---------------------------------------------------
def model_of(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A Qwen2 model of ``shape`` with seeded random weights (the same on every rank)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, inter, vocab, heads, kv_heads, tied = SHAPES[shape]
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty gives every parameter storage of its own, tied ones included
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32))
    return model


def rank_main(rank: int, args: argparse.Namespace, port: int, out_path: str) -> None:
    from skyrl_backends.weight_sync import connect_broadcast, make_sender, sync_weights
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=2)
    device = f"cuda:{rank}" if gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    sharded = model_of(args.shape, dtype, device)
    full = model_of(args.shape, dtype, device) if rank == 0 else None
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    engine = PipeEngine(args.shape, args.dtype, "cuda:1" if gpu else "cpu") if rank == 0 else None
    strategies = ["cuda_ipc", "broadcast"] if gpu else ["shared_memory", "broadcast"]
    layouts = {"broadcast": ["packed"] if gpu else ["packed", "per_tensor"]}
    cases: list[dict[str, Any]] = []

    async def run() -> None:
        for strategy in strategies:
            for layout in layouts.get(strategy, [None]):
                sender = None
                if rank == 0:
                    if strategy == "broadcast":
                        sender = await connect_broadcast(engine, group_name=f"bench_{layout}", layout=layout,
                                                         device=device)
                    else:
                        sender = make_sender(strategy, device=device if gpu else None)
                timings: dict[str, list[float]] = {"unsharded": [], "sharded": []}
                for repeat in range(args.warmup + args.repeats):
                    for case in ("unsharded", "sharded"):  # in turns, so load on the machine hits both alike
                        dist.barrier()
                        started = time.perf_counter()
                        if case == "sharded":
                            await sync_weights(engine, sharded, strategy, sender=sender,
                                               bucket_bytes=args.bucket_bytes)
                        elif rank == 0:
                            await sync_weights(engine, full, strategy, sender=sender, bucket_bytes=args.bucket_bytes)
                        if repeat >= args.warmup:
                            timings[case].append(time.perf_counter() - started)
                if rank == 0:
                    label = strategy + (f" ({'nccl' if gpu else 'gloo'}, {layout})" if layout else "")
                    cases.append({"strategy": label, **timings})
                    sender.close()
        if rank == 0:  # the engine ends up holding the trainer's weights
            reference = dict(full.state_dict())
            want = [float(reference[n].float().sum()) for n in sorted(n for n, _ in qwen2_specs(args.shape))]
            assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-2) for a, b in zip(engine.digest(), want,
                                                                                       strict=True)), \
                "the engine's weights differ from the trainer's"
            engine.stop()
            with open(out_path, "w") as f:
                json.dump(cases, f)

    asyncio.run(run())
    dist.barrier()
    dist.destroy_process_group()


def sharded_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        torch.multiprocessing.spawn(rank_main, args=(args, port, out.name), nprocs=2)
        return json.load(open(out.name))


# -- the LoRA part -------------------------------------------------------------------------------
async def lora_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import skyrl_backends as sb
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from skyrl_backends.lora import config_to_json
    from skyrl_backends.weight_sync import make_sender, sync_lora_adapter, sync_weights

    torch.set_num_threads(args.threads)  # the trainer and the engine share this process
    dtype = getattr(torch, args.dtype)
    model = model_of(args.shape, dtype, "cpu")
    everything = model.state_dict()
    state = {name: everything[name] for name, _ in qwen2_specs(args.shape)}  # a tied head once, as engines hold it
    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                        lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    adapter = {k: v.to(dtype) for k, v in get_peft_model_state_dict(peft_model).items()}
    config_json = config_to_json(peft_model.peft_config["default"])
    with tempfile.TemporaryDirectory() as folder:
        write_model_folder(args.shape, state, folder)
        engine = sb.create_engine(args.backend, model=folder, dtype=args.dtype, enable_lora=True,
                                  max_lora_rank=args.lora_rank, max_model_len=512)
    try:
        # One sender per kind of update, as a trainer keeps them: each reuses its segments step to step.
        senders = {"full": make_sender("shared_memory"), "lora": make_sender("shared_memory")}
        timings: dict[str, list[float]] = {"full": [], "lora": []}
        for repeat in range(args.warmup + args.repeats):
            for case in ("full", "lora"):
                started = time.perf_counter()
                if case == "full":
                    await sync_weights(engine, state, "shared_memory", sender=senders[case],
                                       bucket_bytes=args.bucket_bytes)
                else:
                    await sync_lora_adapter(engine, "bench", adapter, config_json, "shared_memory",
                                            sender=senders[case])
                if repeat >= args.warmup:
                    timings[case].append(time.perf_counter() - started)
        for sender in senders.values():
            sender.close()
        out = await engine.generate([[5, 6, 7]], {"max_generate_length": 2, "temperature": 0.0}, lora_name="bench")
        assert out[0].lora_version == args.warmup + args.repeats
    finally:
        await engine.teardown()
    nbytes = {"full": sum(t.numel() * t.element_size() for t in state.values()),
              "lora": sum(t.numel() * t.element_size() for t in adapter.values())}
    return [{"strategy": f"shared_memory into {args.backend} ({args.dtype})", **timings, "nbytes": nbytes,
             "adapter": f"r={args.lora_rank}, all-linear, {len(adapter)} tensors"}]


# -- report ----------------------------------------------------------------------------------------
def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"\n# trainer side, part {args.part}, {args.device}, shape {args.shape} ({args.dtype}), "
          f"bucket {args.bucket_bytes >> 20} MiB, {args.repeats} repeats (median), cases in turns")
    machine = hardware("gpu" if args.device == "cuda" else "cpu")
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {machine}; torch {torch.__version__}; "
          f"commit {commit}; {args.threads} torch thread(s) per process")
    # Medians of each side, and the median of paired ratios (each run over the baseline run just
    # before it), which a load that drifts during the run disturbs less.
    if args.part == "sharded":
        print("| strategy | unsharded, one rank | sharded, FSDP2 over 2 ranks | unsharded / sharded (medians; paired) "
              "|")
        print("| --- | --- | --- | --- |")
        for row in rows:
            a, b = statistics.median(row["unsharded"]), statistics.median(row["sharded"])
            paired = statistics.median(x / y for x, y in zip(row["unsharded"], row["sharded"], strict=True))
            print(f"| {row['strategy']} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}; {paired:.2f} |")
    else:
        print("| strategy | adapter | full sync | LoRA-only sync | full / LoRA (medians; paired) |")
        print("| --- | --- | --- | --- | --- |")
        for row in rows:
            a, b = statistics.median(row["full"]), statistics.median(row["lora"])
            paired = statistics.median(x / y for x, y in zip(row["full"], row["lora"], strict=True))
            sizes = f"{row['nbytes']['full'] / 1e9:.3f} GB vs {row['nbytes']['lora'] / 1e6:.1f} MB"
            print(f"| {row['strategy']} | {row['adapter']}; {sizes} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | "
                  f"{a / b:.1f}x; {paired:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sharded", "lora"), default="sharded")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bucket-bytes", type=int, default=256 << 20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--backend", default="transformers", help="the engine of the LoRA part")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = sharded_part(args) if args.part == "sharded" else asyncio.run(lora_part(args))
    report(args, rows)


if __name__ == "__main__":
    main()
