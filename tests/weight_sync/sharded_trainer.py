"""One rank of a trainer whose model is sharded with FSDP2 over two processes (gloo, CPU).

Test support for ``test_trainer_side.py`` and ``test_gpu.py``: the test starts engine servers
(``skyrl-backends serve``, :class:`~skyrl_backends.remote.ServerProcess`) and two of these processes;
each rank connects to every server by its URL (``connect_engine``), loads the tiny model, shards it
with ``fully_shard`` and runs the same scenario, calling ``sync_weights`` collectively. Rank 0 passes
the engines and holds an unsharded copy of the model that receives the same changes (the oracle's
weights); the other rank reads only what the engines declare. Each rank prints one JSON line,
``RESULT {...}``, which the test checks.

    python sharded_trainer.py --rank R --world 2 --port P --model DIR \\
        --engines '["http://127.0.0.1:PORT", ...]' [--device cuda]

Cases marked "separate machines" make every rank report a machine of its own, so the ranks gather
their shards over the group instead of writing them into shared memory (the path of ranks on several
machines, and of CUDA IPC and NCCL), which a single test machine could not otherwise reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [[5, 6, 7, 8], [100, 42, 17]]
GREEDY = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
SMALL_BUCKETS = 64 * 1024  # several buckets for the tiny model


def _init(rank: int, world: int, port: int, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)


def _separate_machines(separate: bool) -> None:
    """Test double of the machine detection only: each rank on a machine of its own, or the truth."""
    from skyrl_backends.weight_sync import sharded

    if not hasattr(sharded, "_real_host_key"):
        sharded._real_host_key = sharded._host_key
    sharded._host_key = (lambda: ["machine-of-rank", dist.get_rank()]) if separate else sharded._real_host_key


def _models(model_dir: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The model sharded with FSDP2 (on this rank's GPU with ``device="cuda"``) and, on rank 0, an
    unsharded copy with the same weights, on the CPU."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if device == "cuda":
        model = model.to(f"cuda:{dist.get_rank()}")
    reference = None
    if dist.get_rank() == 0:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, reference


def _step(model: torch.nn.Module, reference: torch.nn.Module | None, seed: int) -> None:
    """A 'training step': the same seeded noise added to every parameter of both models."""
    from torch.distributed.tensor import distribute_tensor

    generator = torch.Generator().manual_seed(seed)
    named_reference = dict(reference.named_parameters()) if reference is not None else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = torch.randn(param.shape, generator=generator) * 0.05
            param.add_(distribute_tensor(full.to(param.device), param.device_mesh, param.placements))
            if name in named_reference:
                named_reference[name].add_(full)


def _oracle(reference: torch.nn.Module) -> list[list[int]]:
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                     min_new_tokens=8, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


async def _served(engines: list[Any]) -> list[dict[str, Any]]:
    served = []
    for engine in engines:
        out = await engine.generate(PROMPTS, GREEDY)
        served.append({"tokens": out.response_ids, "logprobs": out.logprobs,
                       "stamped": [c.weight_version for c in out]})
    return served


async def _error_of(coro: Any) -> dict[str, Any] | None:
    try:
        await coro
    except Exception as exc:  # reported to the test
        return {"type": type(exc).__name__, "problems": getattr(exc, "problems", None), "message": str(exc)}
    return None


async def _versions(engines: list[Any]) -> list[int]:
    return [(await e.refresh()).weight_version for e in engines]


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    from skyrl_backends.remote import connect_engine

    rank = dist.get_rank()
    # Every rank gets its own handle on the same servers (what each rank reads of them: capabilities).
    engines = [connect_engine(url) for url in json.loads(args.engines)]
    try:
        return await _scenario(args, rank, engines)
    finally:
        for engine in engines:
            await engine.teardown()  # the connection; the servers belong to the test


async def _scenario(args: argparse.Namespace, rank: int, engines: list[Any]) -> dict[str, Any]:
    from skyrl_backends.weight_sync import connect_broadcast, make_sender, sync_weights

    model, reference = _models(args.model, args.device)
    result: dict[str, Any] = {"rank": rank, "cases": [], "failures": {}}
    if args.device == "cuda":  # the ranks gather over NCCL; the engine's layout is connect_broadcast's choice
        cases = [("cuda_ipc", {}, False), ("shared_memory", {}, False), ("broadcast", {"apply": "atomic"}, False)]
        if all(e.capabilities.broadcast_layouts != ("per_tensor",) for e in engines):
            cases.append(("broadcast", {"apply": "streamed"}, False))
    else:
        cases = [("shared_memory", {}, False), ("shared_memory", {}, True),
                 ("broadcast", {"layout": "packed", "apply": "atomic"}, False),
                 ("broadcast", {"layout": "per_tensor", "apply": "atomic"}, True),
                 ("broadcast", {"layout": "packed", "apply": "streamed"}, False)]
    for number, (strategy, modes, separate) in enumerate(cases, start=1):
        _separate_machines(separate)
        _step(model, reference, seed=number)
        sender = None
        if strategy == "broadcast" and rank == 0:
            sender = await connect_broadcast(engines, group_name=f"sharded_{number}", timeout_s=120,
                                             device="cuda:0" if args.device == "cuda" else None, **modes)
        elif strategy == "cuda_ipc" and rank == 0:
            sender = make_sender("cuda_ipc", device="cuda:0")
        started = time.perf_counter()
        versions = await sync_weights(engines if rank == 0 else None, model, strategy, sender=sender,
                                      bucket_bytes=SMALL_BUCKETS)
        case: dict[str, Any] = {"strategy": strategy, **modes, "separate_machines": separate, "versions": versions,
                                "seconds": time.perf_counter() - started}
        if rank == 0:
            if sender is not None:
                sender.close()
            case["sharded"] = await _served(engines)
            # The same weights, unsharded, from one process: what the engines must serve.
            case["unsharded_versions"] = await sync_weights(engines, reference, "shared_memory")
            case["unsharded"] = await _served(engines)
            case["oracle"] = _oracle(reference)
        result["cases"].append(case)

    _separate_machines(False)
    # A rank that calls differently fails at once, on every rank.
    failures = result["failures"]
    failures["strategy"] = await _error_of(sync_weights(
        engines if rank == 0 else None, model, "shared_memory" if rank == 0 else "broadcast"))
    failures["bucket_bytes"] = await _error_of(sync_weights(
        engines if rank == 0 else None, model, "shared_memory", bucket_bytes=SMALL_BUCKETS * (rank + 1)))
    # Every rank refuses what the engines refuse, before a byte moves (float16 for float32 engines).
    before = await _versions(engines) if rank == 0 else None
    failures["engine_refuses"] = await _error_of(sync_weights(engines if rank == 0 else None, model,
                                                              "shared_memory", dtype_for=torch.float16))
    if rank == 0:
        failures["versions_after_refusal"] = [await _versions(engines), before]
    failures["tensors"] = await _error_of(sync_weights(engines if rank == 0 else None, model, "tensors"))
    # A rank that does not call: the others give up after timeout_s, naming it; the next sync works.
    if rank == 0:
        failures["missing_rank"] = await _error_of(sync_weights(engines, model, "shared_memory", timeout_s=3))
    _step(model, reference, seed=99)
    result["after_missing_rank"] = await sync_weights(engines if rank == 0 else None, model, "shared_memory")
    if rank == 0:
        result["after_missing_rank_served"] = (await _served(engines))[0]["tokens"]
        result["after_missing_rank_oracle"] = _oracle(reference)
    return result


def launch(engines: list[Any], model_dir: str, device: str = "cpu", env: dict[str, str] | None = None,
           timeout_s: float = 900) -> list[dict[str, Any]]:
    """Run the scenario in two trainer processes (this file) against ``engines`` (``RemoteEngine`` s,
    which each rank reaches by URL); returns each rank's result."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = json.dumps([e.url for e in engines])
    processes = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--world", "2", "--port", str(port),
                                   "--model", model_dir, "--engines", urls, "--device", device],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
                 for rank in range(2)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=timeout_s)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"trainer rank exited {process.returncode} without a result:\n{out[-3000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--engines", required=True, help="the engine servers' URLs, as a JSON list")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: rank r on GPU r, NCCL, and the cases cuda_ipc and NCCL broadcast")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _init(args.rank, args.world, args.port, args.device)
    try:
        result = asyncio.run(scenario(args))
    except Exception:
        result = {"rank": args.rank, "crash": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
