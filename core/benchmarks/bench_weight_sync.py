"""Weight-sync benchmark: every strategy against baselines measured in the same run (not a test).

A full sync moves a whole Qwen2.5-shaped model with random weights from a trainer process into an
engine process, which copies every received tensor into its own parameters (what a backend's
``load_weights`` does) before acknowledging. Printed: median seconds, GB/s, and the ratio to the
baseline each strategy is judged against.

CPU mode (``--mode cpu``, runs anywhere)::

    shared_memory   vs (a) memcpy of the same bytes in one process
    broadcast/gloo  vs (c) raw torch.distributed broadcast of the same tensors (one per tensor)

GPU mode (``--mode gpu``)::

    cuda_ipc        vs (a) device-to-device copy of the same bytes  [engine process on the same GPU]
    cuda_ipc, adopted: the trainer's tensors live in the sender's buckets (``CudaIpcSender.adopt``),
                    so nothing is packed; vs (a) and, paired, vs the warm cuda_ipc sync
    cuda_ipc, adopted, APPLY apply: (``--apply``, default ``copy_all,fused``) the same with the
                    engine's copies queued another way than the replayed load's (a CUDA graph, the
                    large copies on four streams, ``replay.copy_options``): ``copy_all``, a copy per
                    large tensor from Python; ``fused``, one fused copy of every tensor;
                    ``streams2``/``streams4``, spread over CUDA streams; ``graph``, ``graph_streams2``,
                    ``graph_streams4``, from a CUDA graph (``chunks.CopyPlan``'s options); paired vs adopted
    cuda_ipc, adopted module: the same weights as the parameters of a module (nested submodules by
                    name, parameters that require grad, as a trainer holds them), adopted and synced as
                    the module (its state-dict walk remembered, the detached tensors checked): what
                    ``sync_weights(engines, model, sender=...)`` plans at every step; paired vs adopted
    broadcast/nccl  vs (c) raw NCCL broadcast of the same tensors   [engine process on GPU 1; needs 2 GPUs]

(CPU mode has the same adopted case over shared memory.) Every ratio is printed twice: of the medians,
and paired (the median over rounds of each round's ratio: the cases take turns, so one round's cases
share the machine's state). ``--json`` writes every timing with the commit (``SKYRL_COMMIT``, else
``git rev-parse``), the hardware and the versions; ``core/benchmarks/pool_weight_sync.py`` pools such
files from several machine calls into the rows of docs/benchmarks.md.

Broadcast runs in both ways of applying: ``atomic`` (the engine stages every bucket, then copies)
and ``streamed`` (it copies each bucket while the next arrives, through two bucket-sized buffers);
the raw baseline writes straight into the live parameters, which is what ``streamed`` does too.

``check_finite``: the warm colocated sync and the atomic packed broadcast again with
``WeightUpdateRequest.check_finite`` (the engine checks every received value for NaN and infinity
before loading any), each against the same sync without it in the same run; the ratio of times is
printed under the table (``--skip finite`` leaves these cases out).
    --engine vllm|sglang: also a full sync into a real engine through skyrl_backends (cuda_ipc, or
    what the backend declares; warm, and from an adopting sender) vs (b) the engine's own update path
    called directly (vLLM: per-tensor CUDA IPC handles through collective_rpc into load_weights;
    SGLang: update_weights_from_tensor), the three taking turns.

Examples::

    python core/benchmarks/bench_weight_sync.py --mode cpu --shape qwen2.5-0.5b
    python core/benchmarks/bench_weight_sync.py --mode gpu --shape qwen2.5-1.5b --engine vllm

The engine process and the trainer exchange only JSON over a pipe; the bytes move by the strategy.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch
from skyrl_backends.testing.hardware import cpu_model
from skyrl_backends.testing.provenance import measured_commit
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import CudaIpcSender, SharedMemorySender, load_named_tensors, make_receiver
from skyrl_backends.weight_sync.broadcast import BroadcastSender, new_group
from skyrl_backends.weight_sync.chunks import COPY_ALONE_BYTES, CopyPlan, plan
from skyrl_backends.weight_sync.layout_refs import ReceivedLayouts, SentLayouts
from skyrl_backends.weight_sync.replay import copy_options

# name: (hidden, layers, intermediate, vocab, heads, kv_heads, tied embeddings)
SHAPES = {
    "tiny": (128, 2, 256, 512, 4, 2, False),
    "qwen2.5-0.5b": (896, 24, 4864, 151936, 14, 2, True),
    "qwen2.5-1.5b": (1536, 28, 8960, 151936, 12, 2, True),
    "qwen2.5-7b": (3584, 28, 18944, 152064, 28, 4, False),
}


def qwen2_specs(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Qwen2 checkpoint, in checkpoint order."""
    hidden, layers, inter, vocab, heads, kv_heads, tied = SHAPES[shape]
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                  (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                  (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                  (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter)),
                  (p + "post_attention_layernorm.weight", (hidden,))]
    specs.append(("model.norm.weight", (hidden,)))
    if not tied:
        specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


# name: (hidden, layers, experts, expert intermediate, vocab, heads, kv_heads, head_dim): the first
# layers of a Qwen3 MoE checkpoint (Qwen3-30B-A3B's dimensions, 6 of its 48 layers), whose thousands
# of expert tensors make every per-tensor cost of a sync show.
MOE_SHAPES = {
    "qwen3-30b-a3b-6l": (2048, 6, 128, 768, 151936, 32, 4, 128),
}


def moe_specs(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Qwen3 MoE checkpoint, in checkpoint order."""
    hidden, layers, experts, inter, vocab, heads, kv_heads, head_dim = MOE_SHAPES[shape]
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                  (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                  (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                  (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                  (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
                  (p + "mlp.gate.weight", (experts, hidden))]
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            specs += [(q + "gate_proj.weight", (inter, hidden)), (q + "up_proj.weight", (inter, hidden)),
                      (q + "down_proj.weight", (hidden, inter))]
        specs.append((p + "post_attention_layernorm.weight", (hidden,)))
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def tensor_specs(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of ``shape``'s checkpoint: a Qwen2 (SHAPES) or a Qwen3 MoE (MOE_SHAPES)."""
    return moe_specs(shape) if shape in MOE_SHAPES else qwen2_specs(shape)


def random_weights(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {name: torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype)
            for name, s in tensor_specs(shape)}


def as_module(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state dict is ``weights``: a submodule per dotted prefix, each tensor a parameter
    (requiring grad, as a trainer's) sharing the tensor's storage."""
    root = torch.nn.Module()
    for name, tensor in weights.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, torch.nn.Module())
            owner = owner._modules[part]
        owner.register_parameter(leaf, torch.nn.Parameter(tensor))
    return root


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def digest(tensors: dict[str, torch.Tensor]) -> list[float]:
    return [float(t.float().sum()) for _, t in sorted(tensors.items())]


FINITE = " [check_finite]"  # label suffix of the cases that check values, against the same case without


# -- the engine process ---------------------------------------------------------------------------
def engine_main(conn: Any, shape: str, dtype_name: str, device: str, threads: int) -> None:
    """Holds parameters of the model's shape; receives updates and copies them in (like load_weights)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = getattr(torch, dtype_name)
    params = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in tensor_specs(shape)}
    communicators: dict[str, Any] = {}  # one broadcast group per layout under test
    layouts = ReceivedLayouts()  # as a server keeps them: each layout sent in full once, then by id
    copy_plans: dict[str, tuple[tuple[int, ...], CopyPlan]] = {}  # per way of applying: the last plan
    raw_group = None
    conn.send_bytes(b'{"ready": true}')
    while True:
        raw = conn.recv_bytes()
        arrived = time.perf_counter()  # the parse of an update is timed from here
        msg = json.loads(raw)
        op = msg["op"]
        reply: dict[str, Any] = {"ok": True}
        if op == "stop":
            conn.send_bytes(json.dumps(reply).encode())
            return
        if op == "init":
            from skyrl_backends.types import WeightSyncInitInfo

            communicators[msg["slot"]] = make_receiver(WeightSyncInitInfo(**msg["init_info"]), device)
        elif op == "raw_init":
            store = torch.distributed.TCPStore(msg["addr"], msg["port"], 2, is_master=False)
            raw_group = new_group(store, 1, 2, msg["backend"], "raw", "127.0.0.1" if msg["addr"] == "127.0.0.1" else "",
                                  300)
        elif op == "update":
            request = layouts.from_json(msg["request"])
            parse_s = time.perf_counter() - arrived
            communicator = communicators.get(msg.get("slot"))
            first_load: list[float] = []

            # As an engine that loads by name in bulk (the replayed load): the copies planned once
            # for the same received views (copy_all's split: a copy per large tensor and one fused
            # copy of the rest), queued the way the update's "apply" names ("replayed": as the
            # replayed load does; "copy_all": one by one from Python; "fused": one fused copy of
            # everything, as before copy_all).
            apply = msg.get("apply", "replayed")

            def load(named: list[tuple[str, torch.Tensor]], apply: str = apply) -> None:
                first_load[:] = first_load or [time.perf_counter()]
                with torch.no_grad():
                    planned_copies(copy_plans, apply, params, named).run()

            t0 = time.perf_counter()
            load_named_tensors(request, device, load, communicator=communicator)
            sync(device)
            # Atomic: receive, then apply. Streamed: the bucket copies overlap the transfer, so
            # "apply" runs from the first bucket's copy to the end.
            reply.update(parse_s=parse_s, receive_s=first_load[0] - t0, apply_s=time.perf_counter() - first_load[0],
                         staging_bytes=getattr(communicator, "staging_bytes", 0))
        elif op == "raw_receive":
            options = torch.distributed.BroadcastOptions()
            works = [raw_group.broadcast([params[name]], options) for name, _ in tensor_specs(shape)]
            for work in works:
                work.wait()
            sync(device)
        elif op == "digest":
            reply["digest"] = digest(params)
        conn.send_bytes(json.dumps(reply).encode())


# The ways the engine process queues an update's copies (``--apply``): CopyPlan's arguments.
# "replayed" (every case's default): as an engine's replayed load queues them (replay.copy_options).
APPLY_WAYS: dict[str, dict[str, Any]] = {
    "replayed": copy_options(), "copy_all": {}, "fused": {"alone_bytes": None}, "streams2": {"streams": 2},
    "streams4": {"streams": 4}, "graph": {"graph": True}, "graph_streams2": {"streams": 2, "graph": True},
    "graph_streams4": {"streams": 4, "graph": True}}


def planned_copies(plans: dict[str, tuple[tuple[int, ...], CopyPlan]], apply: str, params: dict[str, torch.Tensor],
                   named: list[tuple[str, torch.Tensor]]) -> CopyPlan:
    """The copies of ``named`` into ``params``, planned once while the received tensors are the same
    objects (a kept sender's update arrives as the same views every time, as a replayed load needs;
    the plan holds them, so their ids are not reused)."""
    key = tuple(id(t) for _, t in named)
    known = plans.get(apply)
    if known is None or known[0] != key:
        known = plans[apply] = (key, CopyPlan([params[name] for name, _ in named], [t for _, t in named],
                                              **{"alone_bytes": COPY_ALONE_BYTES, **APPLY_WAYS[apply]}))
    return known[1]


class EngineProcess:
    def __init__(self, shape: str, dtype: str, device: str, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, args=(child, shape, dtype, device, threads), daemon=True)
        self.process.start()
        json.loads(self.conn.recv_bytes())
        self.layouts = SentLayouts()
        self.pending_layout = ""

    def send(self, **msg: Any) -> None:
        self.conn.send_bytes(json.dumps(msg).encode())

    def request_json(self, request: WeightUpdateRequest) -> dict[str, Any]:
        """``request`` as this engine is sent it: its layout in full until the engine took it, then
        by id (layout_refs); the engine process never refuses an id it was sent, so the first
        successful reply marks it taken."""
        body, layout_id = self.layouts.to_json(request)
        self.pending_layout = layout_id
        return body

    def took_layout(self) -> None:
        self.layouts.taken(self.pending_layout)

    def reply(self) -> dict[str, Any]:
        return json.loads(self.conn.recv_bytes())

    def call(self, **msg: Any) -> dict[str, Any]:
        self.send(**msg)
        return self.reply()

    def stop(self) -> None:
        self.call(op="stop")
        self.process.join(30)


# -- measurements -----------------------------------------------------------------------------------
# Each case is set up first and returns a function doing one full sync; the cases then run in turns
# (case 1, case 2, ..., case 1, ...), so a load that comes and goes on the machine hits the baselines
# and the strategies alike.
class Case:
    def __init__(self, label: str, run, baseline: str | None = None, parts: dict[str, list[float]] | None = None,
                 close=None, compare: str | None = None) -> None:
        self.label, self.run, self.baseline, self.parts = label, run, baseline, parts
        self.compare = compare  # another case this one is also set against (paired), e.g. the path it replaces
        self.close = close or (lambda: None)
        self.times: list[float] = []
        self.staging: list[int] = []  # what the engine holds for receiving (broadcast cases)


def copy_case(weights: dict[str, torch.Tensor], device: str, label: str) -> Case:
    """(a) One copy of the same number of bytes between two preallocated buffers."""
    total = sum(t.numel() * t.element_size() for t in weights.values())
    src = torch.empty(total, dtype=torch.uint8, device=device)
    offset = 0
    for t in weights.values():  # the same bytes, flattened
        n = t.numel() * t.element_size()
        src[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
        offset += n
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        sync(device)

    return Case(label, run)


def colocated_case(engine: EngineProcess, make_sender, weights: dict[str, torch.Tensor] | torch.nn.Module,
                   bucket_bytes: int, label: str, baseline: str, fresh_sender: bool = False, check_finite: bool = False,
                   compare: str | None = None, apply: str = "replayed") -> Case:
    """Full sync: pack into the transport's buffers, one request, engine receives and applies, ack.
    A kept sender reuses its buffers (warm); ``fresh_sender`` makes a new one every time (cold).
    ``apply`` names how the engine queues its copies (APPLY_WAYS; default as a replayed load does).

    Parts of each sync: the sender's ``pack`` (plan and write), ``encode`` (the request and its JSON),
    the engine's ``parse`` (the JSON and the request: by id after the first, ``layout_refs``),
    ``receive`` and ``apply``, and the
    ``rest``: the pipe both ways, the processes' wake-ups and the reply."""
    parts: dict[str, list[float]] = {name: [] for name in ("pack_s", "encode_s", "parse_s", "receive_s", "apply_s",
                                                           "rest_s")}
    kept = None if fresh_sender else make_sender()

    def run() -> None:
        sender = make_sender() if fresh_sender else kept
        t0 = time.perf_counter()
        layout = plan(weights, bucket_bytes)
        payload = sender.write(layout)
        packed = time.perf_counter()
        request = layout.request(sender.strategy, payload, check_finite)
        body = json.dumps({"op": "update", "request": engine.request_json(request), "apply": apply}).encode()
        encoded = time.perf_counter()
        engine.conn.send_bytes(body)
        reply = engine.reply()
        engine.took_layout()
        total = time.perf_counter() - t0
        measured = dict(pack_s=packed - t0, encode_s=encoded - packed, parse_s=reply["parse_s"],
                        receive_s=reply["receive_s"], apply_s=reply["apply_s"])
        for name, value in measured.items():
            parts[name].append(value)
        parts["rest_s"].append(total - sum(measured.values()))
        if fresh_sender:
            sender.close()

    return Case(label, run, baseline, parts, close=kept.close if kept is not None else None, compare=compare)


def broadcast_case(engine: EngineProcess, weights: dict[str, torch.Tensor], backend: str, device: str,
                   bucket_bytes: int, label: str, baseline: str, layout: str = "packed", apply: str = "atomic",
                   check_finite: bool = False) -> Case:
    slot = f"{layout}_{apply}_{bucket_bytes}_{check_finite}"  # one group (and one receiver) per case
    sender = BroadcastSender(2, "127.0.0.1", 0, backend, f"bench_{slot}", device, layout=layout, apply=apply)
    joiner = threading.Thread(target=sender.join)
    joiner.start()
    engine.call(op="init", init_info={**sender.init_info(1).__dict__}, slot=slot)
    joiner.join()

    def run() -> None:
        layout = plan(weights, bucket_bytes)
        request = layout.request("broadcast", sender.payload(layout), check_finite)
        engine.send(op="update", request=engine.request_json(request), slot=slot)
        sender.send(layout)
        case.staging[:] = [engine.reply()["staging_bytes"]]
        engine.took_layout()

    case = Case(label, run, baseline, close=sender.close)
    return case


def raw_broadcast_case(engine: EngineProcess, weights: dict[str, torch.Tensor], backend: str, device: str,
                       label: str) -> Case:
    """(c) torch.distributed broadcast of each tensor, straight into the engine's parameters (not
    atomic: a transfer failing midway leaves a mix of old and new weights)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    holder: dict[str, Any] = {}
    joiner = threading.Thread(target=lambda: holder.update(
        group=new_group(store, 0, 2, backend, "raw", "127.0.0.1", 300)))
    joiner.start()
    engine.send(op="raw_init", addr="127.0.0.1", port=store.port, backend=backend)
    joiner.join()
    engine.reply()
    group = holder["group"]
    options = torch.distributed.BroadcastOptions()
    ordered = list(weights.values())

    def run() -> None:
        # Every collective is issued at once and waited for at the end: the fastest use of the raw API.
        engine.send(op="raw_receive")
        works = [group.broadcast([tensor], options) for tensor in ordered]
        for work in works:
            work.wait()
        sync(device)
        engine.reply()

    return Case(label, run)


def run_interleaved(cases: list[Case], repeats: int, warmup: int) -> None:
    for case in cases:
        for _ in range(warmup):
            case.run()
        if case.parts:
            for values in case.parts.values():
                values.clear()
    for _ in range(repeats):
        for case in cases:
            t0 = time.perf_counter()
            case.run()
            case.times.append(time.perf_counter() - t0)


# -- real engines (GPU) ---------------------------------------------------------------------------
def write_model_folder(shape: str, weights: dict[str, torch.Tensor], folder: str) -> str:
    """A Qwen2 checkpoint folder with these weights and a small tokenizer (engines get token ids)."""
    from pathlib import Path

    from safetensors.torch import save_file
    from skyrl_backends.testing.tiny_model import build_tokenizer

    hidden, layers, inter, vocab, heads, kv_heads, tied = SHAPES[shape]
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
              "num_hidden_layers": layers, "intermediate_size": inter, "vocab_size": vocab,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
    build_tokenizer(Path(folder))
    return folder


async def bench_real_engine(backend: str, shape: str, weights: dict[str, torch.Tensor], bucket_bytes: int,
                            repeats: int, warmup: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sync into a real engine through skyrl (warm sender, and an adopting sender where the strategy
    has one) and by the engine's own path, in turns, one phase per sender; returns the engine's
    version and options."""
    import skyrl_backends as sb
    from skyrl_backends.weight_sync import make_sender, sync_weights

    with tempfile.TemporaryDirectory() as folder:
        write_model_folder(shape, weights, folder)
        engine = sb.create_engine(backend, model=folder, dtype="bfloat16", gpu_memory_utilization=0.3,
                                  max_model_len=2048)
        senders = []
        try:
            strategy = "cuda_ipc" if "cuda_ipc" in engine.capabilities.weight_sync_strategies else "tensors"
            own_label = f"{backend}: own path (b)"
            if getattr(engine.impl, "weight_path", "worker_extension") != "worker_extension":
                # The vLLM plugin's tensors then cross through its weight-transfer engine (skyrl's
                # shared memory or CUDA IPC), not vLLM's per-tensor handles: not the engine's own path.
                own_label = f"{backend}: tensors, {engine.impl.weight_path} path (b, not vLLM's own)"
            own = await _own_path(backend, engine, weights)
            # One phase per skyrl sender, each in turns with the engine's own path: a trainer keeps one
            # sender, and two taking turns into one engine make it open the other's handles again and
            # record its load again at every update (the engine keeps the last sender's only), which
            # is what no training run pays (docs/benchmarks.md, 2026-12-05 sixth session).
            phases: list[list[tuple[str, Any, str | None, str | None]]] = []
            if strategy != "tensors":
                sender = make_sender(strategy)
                adopter = make_sender(strategy)
                adopted = adopter.adopt(dict(weights), bucket_bytes)
                senders += [sender, adopter]

                async def ours() -> None:
                    await sync_weights(engine, weights, strategy, bucket_bytes=bucket_bytes, sender=sender)

                async def ours_adopted() -> None:
                    await sync_weights(engine, adopted, strategy, bucket_bytes=bucket_bytes, sender=adopter)

                own_beside_adopted = f"{own_label}, beside adopted"
                phases += [[(f"{backend}: skyrl {strategy}", ours, own_label, None), (own_label, own, None, None)],
                           [(f"{backend}: skyrl {strategy}, adopted", ours_adopted, own_beside_adopted, None),
                            (own_beside_adopted, own, None, None)]]
            else:  # the backend declares no faster strategy here
                async def ours() -> None:
                    await sync_weights(engine, weights, strategy, bucket_bytes=bucket_bytes)

                phases.append([(f"{backend}: skyrl {strategy}", ours, own_label, None), (own_label, own, None, None)])
            if backend == "sglang":
                phases[0].append((f"{backend}: update_weights_from_tensor of no tensors (its floor)",
                                  _sglang_request_floor(engine), None, None))
            for paths in phases:
                for _, fn, _, _ in paths:
                    for _ in range(warmup):
                        await fn()
                times: dict[str, list[float]] = {label: [] for label, *_ in paths}
                for _ in range(repeats):  # in turns, as the process-level cases
                    for label, fn, _, _ in paths:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        await fn()
                        torch.cuda.synchronize()
                        times[label].append(time.perf_counter() - t0)
                for label, _, baseline, compare in paths:
                    rows.append({"strategy": label, "times": times[label], "baseline": baseline, "compare": compare})
            return {"backend": backend, "version": engine_version(backend),
                    "replayed_loads": await _replayed_loads(engine)}
        finally:
            for sender in senders:
                sender.close()
            await engine.teardown()


def _sglang_request_floor(engine: Any):
    """SGLang's own update request carrying no tensors: what any update through it costs at least
    (the request's way to the scheduler and back, the cache flush), whatever the load."""
    from sglang.srt.managers import io_struct
    from sglang.srt.utils import MultiprocessingSerializer

    impl = engine.impl

    async def run() -> None:
        obj = io_struct.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=[MultiprocessingSerializer.serialize([]) for _ in range(impl.tp_size)],
            load_format=None, flush_cache=True)
        success, message = await impl._on_loop(impl._update_in_session(impl.tm.update_weights_from_tensor, obj))
        assert success, message
    return run


async def _replayed_loads(engine: Any) -> Any:
    """The vLLM workers' counts of recorded and replayed loads (skyrl_backends.weight_sync.replay):
    whether the syncs above replayed the engine's load. SGLang's scheduler logs it instead."""
    worker_call = getattr(engine.impl, "_worker_call", None)
    if worker_call is None:
        return None
    try:
        counts = await worker_call("skyrl_replayed_loads")
    except Exception as exc:  # a plugin without the call
        return repr(exc)
    print(f"# replayed loads, per worker: {counts}")
    return counts


def engine_version(backend: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(backend)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(backend)
        return getattr(module, "__version__", None)


async def _own_path(backend: str, engine: Any, weights: dict[str, torch.Tensor]):
    """(b) The engine's own update path, called on the backend's engine object directly (no facade
    validation): the plugins' "tensors" path is the engine's native one (vLLM: one CUDA IPC handle
    per tensor through collective_rpc into load_weights; SGLang: update_weights_from_tensor)."""
    request = WeightUpdateRequest.from_named_tensors(list(weights.items()))
    # The hook takes the version to label tokens with; these labels never reach a completion here,
    # but they keep growing as the facade's would.
    versions = itertools.count(1_000_000)

    async def run() -> None:
        await engine.impl.skyrl_backends_update_named_weights(request=request, version=next(versions))
    return run


# -- report -------------------------------------------------------------------------------------------
def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g} {unit}"
    return f"{nbytes} B"


def hardware(mode: str) -> str:
    text = f"{cpu_model()}, {os.cpu_count()} cores visible"
    if mode == "gpu":
        text += "; " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return text


def paired(times: list[float], base: list[float]) -> float | None:
    """The median over rounds of each round's time ratio (``times[i] / base[i]``), None if unpaired."""
    if not times or len(times) != len(base):
        return None
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def commit() -> str | None:
    return measured_commit(os.path.dirname(os.path.abspath(__file__)))


def report(rows: list[dict[str, Any]], nbytes: int, args: argparse.Namespace, ntensors: int,
           extra: dict[str, Any] | None = None) -> None:
    by_label = {r["strategy"]: statistics.median(r["times"]) for r in rows}
    times = {r["strategy"]: r["times"] for r in rows}
    measured = commit()
    print(f"\n# weight sync, {args.mode}, shape {args.shape} ({ntensors} tensors, {nbytes / 1e9:.3f} GB {args.dtype}), "
          f"bucket {_size(args.bucket_bytes)}, {args.repeats} repeats (median)")
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit {measured}; {hardware(args.mode)}; "
          f"torch {torch.__version__}; {args.threads} torch thread(s) per process; cases run in turns"
          + (f"; {extra['backend']} {extra['version']}" if extra else ""))
    print(f"| {'transfer':44} | {'median':>10} | {'GB/s':>7} | {'vs baseline (medians; paired)':>40} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 9}|{'-' * 42}|")
    for row in rows:
        t = by_label[row["strategy"]]
        base = row.get("baseline")
        # speed relative to the baseline: 100% = as fast, 50% = takes twice as long
        versus = ""
        if base in by_label:
            row["ratio"] = by_label[base] / t
            row["paired"] = paired(times[base], row["times"])  # baseline time / case time, per round
            versus = f"{row['ratio']:.0%}; {row['paired']:.0%} of {base.split()[0]} speed" if row["paired"] else \
                f"{row['ratio']:.0%} of {base.split()[0]} speed"
        print(f"| {row['strategy']:44} | {t * 1e3:8.2f}ms | {nbytes / t / 1e9:7.2f} | {versus:>40} |")
        if "parts" in row:
            parts = ", ".join(f"{k[:-2]} {v * 1e3:.2f}ms" for k, v in row["parts"].items())
            print(f"|   {'(' + parts + ')':42} | {'':10} | {'':7} | {'':40} |")
        if row.get("staging_bytes"):
            held = f"(engine holds {row['staging_bytes'] / 2**20:.0f} MiB to receive)"
            print(f"|   {held:42} | {'':10} | {'':7} | {'':40} |")
    for row in rows:
        other = row.get("compare")
        if other in by_label:
            row["compare_paired"] = paired(row["times"], times[other])
            print(f"# {row['strategy']}: {by_label[row['strategy']] / by_label[other]:.2f}x the time of {other} "
                  f"(medians {by_label[row['strategy']] * 1e3:.2f} vs {by_label[other] * 1e3:.2f} ms; paired "
                  f"{row['compare_paired']:.2f}x)")
    finite = [r for r in rows if r["strategy"].endswith(FINITE) and r.get("baseline") in by_label]
    for row in finite:
        with_check, without = by_label[row["strategy"]], by_label[row["baseline"]]
        print(f"# {FINITE[2:-1]}: {row['baseline']}: {with_check / without:.2f}x the time of the same sync without "
              f"it ({with_check * 1e3:.1f} vs {without * 1e3:.1f} ms)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "commit": measured, "nbytes": nbytes, "ntensors": ntensors,
                       "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
                       "hardware": hardware(args.mode), "torch": torch.__version__, "engine": extra,
                       "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES | MOE_SHAPES), default=None,
                        help="default: qwen2.5-0.5b on CPU, qwen2.5-1.5b on GPU")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bucket-bytes", type=int, default=None, help="default: 256 MiB on CPU, 1 GiB on GPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--engine", choices=("none", "vllm", "sglang"), default="none",
                        help="GPU: also sync into a real engine and compare with its own update path")
    parser.add_argument("--skip", default="",
                        help="comma-separated cases to skip: "
                             "colocated,warm,adopted,module,cold,broadcast,streamed,per_tensor,raw,finite "
                             "(warm: the packing sender's cases and their engine; with it skipped the adopted sender "
                             "holds the weights themselves, so a 7B model fits an 80 GB GPU with module skipped too)")
    parser.add_argument("--apply", default="copy_all,fused",
                        help="comma-separated ways for the adopted sync's engine to apply besides the replayed "
                             f"load's, each a case of its own: {', '.join(w for w in APPLY_WAYS if w != 'replayed')} "
                             "(streams and graphs: GPU only; empty: none)")
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the trainer and of each engine process (default: 1 on CPU, where "
                             "trainer and engine share the cores; torch's default on GPU)")
    args = parser.parse_args()
    gpu = args.mode == "gpu"
    args.shape = args.shape or ("qwen2.5-1.5b" if gpu else "qwen2.5-0.5b")
    args.bucket_bytes = args.bucket_bytes or ((1 << 30) if gpu else (256 << 20))
    args.repeats = args.repeats or (20 if gpu else 5)
    skip = set(filter(None, args.skip.split(",")))
    args.apply = list(filter(None, args.apply.split(",")))
    unknown = [w for w in args.apply if w not in APPLY_WAYS or w == "replayed"]
    if unknown:
        parser.error(f"--apply: unknown way(s) {unknown}; choose among {[w for w in APPLY_WAYS if w != 'replayed']}")
    if args.engine != "none" and args.shape in MOE_SHAPES:
        parser.error(f"--engine builds a Qwen2 model for the engine; {args.shape} is a MoE shape (no engine)")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs CUDA")
    device = "cuda:0" if gpu else "cpu"
    args.threads = args.threads or (torch.get_num_threads() if gpu else 1)
    torch.set_num_threads(args.threads)
    weights = random_weights(args.shape, getattr(torch, args.dtype), device)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    expected = digest(weights)
    copy_label = "(a) device-to-device copy" if gpu else "(a) memcpy, one process"
    cases = [copy_case(weights, device, copy_label)]
    engines: list[EngineProcess] = []
    try:
        if "colocated" not in skip:
            if gpu:
                make, warm = (lambda: CudaIpcSender(device)), "cuda_ipc (warm: buffers reused)"
            else:
                make, warm = SharedMemorySender, "shared_memory (warm: segments reused)"
            if "warm" not in skip:
                colocated = EngineProcess(args.shape, args.dtype, device, args.threads)  # same device: colocated
                engines.append(colocated)
                # One sender for both warm cases: the engine keeps the mappings (handles) of one
                # sender's buffers, and two senders taking turns would have it map them afresh.
                sender = make()
                cases.append(colocated_case(colocated, lambda: sender, weights, args.bucket_bytes, warm, copy_label))
                if "finite" not in skip:
                    cases.append(colocated_case(colocated, lambda: sender, weights, args.bucket_bytes,
                                                warm + FINITE, warm, check_finite=True))
            if "adopted" not in skip:
                # Its own engine: an engine keeps the buffers of the sender it received from last, and
                # two senders taking turns into one engine would have it open them afresh every time.
                adopting = EngineProcess(args.shape, args.dtype, device, args.threads)
                engines.append(adopting)
                adopter = make()
                if "warm" in skip:
                    # Nothing else packs from the trainer's tensors: the buckets become the weights,
                    # one copy fewer (a 7B model then fits an 80 GB GPU beside the copy floor's buffers)
                    weights = adopted = adopter.adopt(weights, args.bucket_bytes)
                else:
                    adopted = adopter.adopt(dict(weights), args.bucket_bytes)  # a copy of the weights, in the buckets
                adopted_label = f"{warm.split()[0]}, adopted (nothing packed)"
                cases.append(colocated_case(adopting, lambda: adopter, adopted, args.bucket_bytes, adopted_label,
                                            copy_label, compare=None if "warm" in skip else warm))
                if "module" not in skip:
                    # Its own engine and sender, as above; the module's parameters start as the weights'
                    # copies and move into that sender's buckets.
                    module_engine = EngineProcess(args.shape, args.dtype, device, args.threads)
                    engines.append(module_engine)
                    module_adopter = make()
                    model = as_module({name: tensor.clone() for name, tensor in weights.items()})
                    module_adopter.adopt(model, args.bucket_bytes)
                    cases.append(colocated_case(module_engine, lambda: module_adopter, model, args.bucket_bytes,
                                                f"{warm.split()[0]}, adopted module (nothing packed)", copy_label,
                                                compare=adopted_label))
                # The same sync applied other ways: "fused" as before copy_all split its copies by
                # size (one fused copy), the others as CopyPlan's options queue them.
                for apply in args.apply:
                    cases.append(colocated_case(adopting, lambda: adopter, adopted, args.bucket_bytes,
                                                f"{adopted_label}, {apply} apply", copy_label, compare=adopted_label,
                                                apply=apply))
            if not gpu:
                if "cold" not in skip:  # its own engine: its mappings would evict the warm case's
                    cold = EngineProcess(args.shape, args.dtype, device, args.threads)
                    engines.append(cold)
                    cases.append(colocated_case(cold, SharedMemorySender, weights, args.bucket_bytes,
                                                "shared_memory (cold: new segments)", copy_label, fresh_sender=True))
        backend = "nccl" if gpu else "gloo"
        if {"broadcast", "streamed", "per_tensor", "raw"} - skip:
            if gpu and torch.cuda.device_count() < 2:
                print("broadcast: skipped (needs 2 GPUs)", file=sys.stderr)
            else:
                remote = EngineProcess(args.shape, args.dtype, "cuda:1" if gpu else "cpu", args.threads)
                engines.append(remote)
                raw_label = f"(c) raw {backend} broadcast, per tensor"
                if "raw" not in skip:
                    cases.append(raw_broadcast_case(remote, weights, backend, device, raw_label))
                # On GPU also smaller buckets: packing, the collective and (streamed) the engine's
                # copies overlap sooner.
                sizes = [args.bucket_bytes] + ([min(args.bucket_bytes, 256 << 20)] if gpu else [])
                for apply in ("atomic", "streamed"):
                    if ("broadcast" if apply == "atomic" else "streamed") in skip:
                        continue
                    for size in dict.fromkeys(sizes):
                        label = f"broadcast ({backend}, packed {_size(size)}, {apply})"
                        cases.append(broadcast_case(remote, weights, backend, device, size, label, raw_label,
                                                    apply=apply))
                        if apply == "atomic" and size == args.bucket_bytes and "finite" not in skip:
                            cases.append(broadcast_case(remote, weights, backend, device, size, label + FINITE,
                                                        label, apply=apply, check_finite=True))
                if "per_tensor" not in skip:  # the layout of engines that receive natively (SGLang)
                    cases.append(broadcast_case(remote, weights, backend, device, args.bucket_bytes,
                                                f"broadcast ({backend}, per tensor)", raw_label, "per_tensor"))
        run_interleaved(cases, args.repeats, args.warmup)
        for engine in engines:  # every engine ends up holding the trainer's weights
            got = engine.call(op="digest")["digest"]
            assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-3) for a, b in zip(got, expected, strict=False)), \
                "engine weights differ from the trainer's"
    finally:
        for case in cases:
            case.close()
        for engine in engines:
            engine.stop()
    rows = [{"strategy": c.label, "times": c.times, "baseline": c.baseline, "compare": c.compare,
             **({"parts": {k: statistics.median(v) for k, v in c.parts.items()}} if c.parts else {}),
             **({"staging_bytes": c.staging[0]} if c.staging else {})}
            for c in cases]
    extra = None
    if gpu and args.engine != "none":
        import asyncio

        extra = asyncio.run(bench_real_engine(args.engine, args.shape, weights, args.bucket_bytes, args.repeats,
                                              args.warmup, rows))
    report(rows, nbytes, args, len(weights), extra)


if __name__ == "__main__":
    main()
