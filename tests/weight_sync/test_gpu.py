"""GPU proofs: CUDA IPC into another process and into real engines, NCCL broadcast between two GPUs
and into a real engine on the second GPU, and a trainer sharded with FSDP2 over two GPUs syncing by
CUDA IPC and NCCL.

Skipped without CUDA. Run on the GPU machine in an environment with the engine installed, e.g.::

    SKYRL_TEST_MODEL=... python -m pytest -q tests/weight_sync/test_gpu.py          # 1 GPU: IPC, engines
    (on nvidia-h100-x2 the NCCL test runs too)
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import multiprocessing as mp
import os
import threading

import native_broadcast_peer  # beside this file: the conftest puts the folder on sys.path
import pytest
import sharded_trainer
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.remote import ServerProcess, connect_engine, launch_engine
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import CudaIpcSender, connect_broadcast, sync_weights
from skyrl_backends.weight_sync.broadcast import BroadcastSender
from skyrl_backends.weight_sync.chunks import plan
from skyrl_backends.weight_sync.manifest import request_to_json
from skyrl_backends.weight_sync.nccl_transport import CUMEM_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _weights(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(256, 256, generator=g, device=device).to(torch.bfloat16)
            for i in range(8)} | {"norm.weight": torch.ones(256, device=device)}


def _sums(weights) -> dict[str, float]:
    return {n: float(t.double().sum()) for n, t in weights.items()}


def _peer(init_info, device):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=native_broadcast_peer.receive_with_skyrl, args=(child, init_info, device))
    return parent, process


def _ask(pipe, request: WeightUpdateRequest):
    pipe.send_bytes(json.dumps(request_to_json(request)).encode())
    return json.loads(pipe.recv_bytes())


@pytest.mark.parametrize("streams,graph", [(2, False), (4, False), (1, True), (2, True), (4, True)])
def test_copy_plan_on_streams_and_in_a_graph_copies_what_the_sources_hold_at_each_run(streams, graph):
    from skyrl_backends.weight_sync.chunks import CopyPlan

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1024, 512), (7,), (2048, 256), (300, 1024), (16,), (512, 512)]
    sources = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    destinations = [torch.zeros(s, device="cuda", dtype=torch.bfloat16 if i == 1 else torch.float32)
                    for i, s in enumerate(shapes)]
    copies = CopyPlan(destinations, sources, alone_bytes=1 << 16, streams=streams, graph=graph)
    assert len(copies.lanes) == min(streams, 4) and copies.graph == graph
    for step in range(3):
        work = torch.cuda.Stream()
        with torch.cuda.stream(work):  # the plan runs on whatever stream is current, ordered with it
            for source in sources:
                source.add_(1.0)  # queued before the copies: they must see it
            copies.run()
            for destination in destinations:
                destination.mul_(2.0)  # queued after: it must see the copies' values
        torch.cuda.synchronize()
        for destination, source in zip(destinations, sources, strict=True):
            assert torch.equal(destination, (source.to(destination.dtype) * 2.0)), f"step {step}"


def test_cuda_ipc_within_one_process_hands_over_the_senders_buffers():
    # An engine in the trainer's own process (SGLang's Engine) cannot open its own process's handles.
    from skyrl_backends.weight_sync.receive import receive_named_tensors

    sender = CudaIpcSender("cuda:0")
    weights = _weights("cuda:0", 3)
    layout = plan(weights, bucket_bytes=300 * 1024)
    request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", sender.write(layout))
    received = dict(receive_named_tensors(request, device="cuda:0"))
    assert _sums(received) == pytest.approx(_sums(weights))
    sender.close()
    del received
    import gc

    gc.collect()
    with pytest.raises(WeightUpdateError, match="no live CudaIpcSender"):
        list(receive_named_tensors(request, device="cuda:0"))


def test_cuda_ipc_into_another_process_reuses_handles_and_refuses_bad_ones():
    pipe, peer = _peer(None, "cuda:0")
    peer.start()
    assert pipe.recv_bytes() == b"joined"
    sender = CudaIpcSender("cuda:0")
    try:
        handles = None
        for seed in (1, 2):  # the second update reuses the buffers, hence the same handles
            weights = _weights("cuda:0", seed)
            layout = plan(weights, bucket_bytes=300 * 1024)
            request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", sender.write(layout))
            assert len(request.payload["buckets"]) > 1
            assert _ask(pipe, request)["sums"] == pytest.approx(_sums(weights))
            current = [b["ipc"]["handle"] for b in request.payload["buckets"]]
            assert handles is None or current == handles
            handles = current
        bad = copy.deepcopy(request.payload)
        bad["buckets"][-1]["ipc"]["storage_nbytes"] = 16
        reply = _ask(pipe, WeightUpdateRequest(request.names, request.dtypes, request.shapes, "cuda_ipc", bad))
        assert "holds 16 bytes" in reply["error"][f"payload.buckets[{len(bad['buckets']) - 1}].ipc"]
    finally:
        pipe.send_bytes(b"stop")
        peer.join(60)
        sender.close()


def test_an_adopted_model_syncs_by_cuda_ipc_without_a_copy_through_handles_opened_once():
    """The trainer's tensors live in the sender's buckets: a sync copies none of them, the engine
    opens each bucket's handle once for all steps, a reallocation (another bucket size) is opened
    anew, and a request made before it is refused, not read through its stale handle."""
    pipe, peer = _peer(None, "cuda:0")
    peer.start()
    assert pipe.recv_bytes() == b"joined"
    sender = CudaIpcSender("cuda:0")
    try:
        weights = sender.adopt(_weights("cuda:0", 4), bucket_bytes=300 * 1024)
        opened = None
        for _step in range(3):
            with torch.no_grad():  # a training step, in place on the current stream
                for tensor in weights.values():
                    tensor.mul_(0.5).add_(1)
            layout = plan(weights, bucket_bytes=300 * 1024)
            request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", sender.write(layout))
            assert sender.copied == 0
            reply = _ask(pipe, request)
            assert reply["sums"] == pytest.approx(_sums(weights))
            assert opened is None or reply["handles_opened"] == opened  # nothing opened again
            opened = reply["handles_opened"]
        assert opened == len(request.payload["buckets"])
        stale = request
        layout = plan(weights, bucket_bytes=200 * 1024)  # other buckets: new buffers, a new generation
        fresh = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", sender.write(layout))
        assert sender.copied == len(weights)
        reply = _ask(pipe, fresh)
        assert reply["sums"] == pytest.approx(_sums(weights))
        assert reply["handles_opened"] == opened + len(fresh.payload["buckets"])
        reply = _ask(pipe, stale)
        assert "reallocated its buffers" in reply["error"]["payload.buckets[0].ipc.generation"]
    finally:
        pipe.send_bytes(b"stop")
        peer.join(60)
        sender.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_broadcast_between_two_gpus_in_every_layout_and_apply_mode():
    """Streamed: each bucket is loaded (copies queued on the receiver's stream) while the next
    arrives, and bucket i + 2 lands in bucket i's buffer; wrong stream ordering shows as wrong sums."""
    sender = BroadcastSender(2, "127.0.0.1", 0, "nccl", "nccl_test", device="cuda:0", timeout_s=120)
    pipe, peer = _peer({**sender.init_info(1).__dict__}, "cuda:1")
    joiner = threading.Thread(target=sender.join)
    joiner.start()
    peer.start()
    joiner.join(120)
    assert pipe.recv_bytes() == b"joined"
    try:
        for seed, (layout_name, apply) in enumerate([("packed", "atomic"), ("per_tensor", "atomic"),
                                                     ("packed", "streamed"), ("packed", "streamed")]):
            sender.layout, sender.apply = layout_name, apply
            weights = _weights("cuda:0", seed)
            layout = plan(weights, bucket_bytes=300 * 1024)
            request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "broadcast",
                                          sender.payload(layout))
            pipe.send_bytes(json.dumps(request_to_json(request)).encode())
            sender.send(layout)
            reply = json.loads(pipe.recv_bytes())
            assert reply["sums"] == pytest.approx(_sums(weights))
            if apply == "streamed":
                assert len(layout.buckets) >= 4 and reply["loads"] == len(layout.buckets)
                assert reply["staging_bytes"] == 2 * max(b.nbytes for b in layout.buckets)
    finally:
        pipe.send_bytes(b"stop")
        peer.join(60)
        sender.close()


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_cuda_ipc_into_a_real_engine_matches_its_own_update_path(backend, model_dir):
    """After a cuda_ipc sync the engine serves exactly what it serves after its own ("tensors")
    path loaded the same weights, and that differs from before; a bad update changes nothing."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    import skyrl_backends as sb

    async def scenario():
        # SGLang 0.5.17's RMSNorm kernel has no float32 (its engine dies on the first forward).
        dtype = "bfloat16" if backend == "sglang" else "float32"
        engine = sb.create_engine(backend, model=model_dir, dtype=dtype, gpu_memory_utilization=0.3)
        try:
            if "cuda_ipc" not in engine.capabilities.weight_sync_strategies:
                pytest.skip(f"backend {backend!r} does not declare weight sync strategy 'cuda_ipc'")
            params = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True}
            prompts = [[5, 6, 7, 8], [100, 42, 17]]
            before = (await engine.generate(prompts, params)).response_ids
            from transformers import AutoModelForCausalLM

            state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
            g = torch.Generator().manual_seed(5)
            weights = {n: (t + 0.5 * t.std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)).cuda()
                       for n, t in state.items()}
            sender = CudaIpcSender("cuda:0")
            [version] = await sync_weights(engine, weights, "cuda_ipc", sender=sender, bucket_bytes=64 * 1024)
            ours = await engine.generate(prompts, params)
            assert ours.response_ids != before and ours[0].weight_version == version
            # The engine's own path takes tensors in the engine's dtype (sync_weights converts).
            await engine.update_weights_from_tensors([(n, t.to(getattr(torch, dtype))) for n, t in weights.items()])
            assert (await engine.generate(prompts, params)).response_ids == ours.response_ids
            bad = dict(weights)
            bad["model.norm.weight"] = bad["model.norm.weight"][:-1]
            with pytest.raises(WeightUpdateError):
                await sync_weights(engine, bad, "cuda_ipc", sender=sender)
            assert (await engine.generate(prompts, params)).response_ids == ours.response_ids
            sender.close()
        finally:
            await engine.teardown()

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_replayed_loads_serve_what_the_engines_own_load_serves(backend, model_dir):
    """Colocated CUDA IPC updates through one sender: the engine's first load is recorded, the next
    ones are replayed as one fused copy (skyrl_backends.weight_sync.replay). After each of them the
    engine serves exactly what it serves once its own path has loaded the same weights."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    import skyrl_backends as sb
    from transformers import AutoModelForCausalLM

    async def scenario():
        dtype = "bfloat16"  # SGLang 0.5.17's RMSNorm kernel has no float32
        engine = sb.create_engine(backend, model=model_dir, dtype=dtype, gpu_memory_utilization=0.3)
        try:
            params = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True}
            prompts = [[5, 6, 7, 8], [100, 42, 17]]
            state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
            sender = CudaIpcSender("cuda:0")
            served = []
            for step in range(3):
                g = torch.Generator().manual_seed(10 + step)
                weights = {n: (t + 0.5 * t.std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)).to(
                    "cuda", torch.bfloat16) for n, t in state.items()}
                await sync_weights(engine, weights, "cuda_ipc", sender=sender, bucket_bytes=64 * 1024)
                ours = (await engine.generate(prompts, params)).response_ids
                await engine.update_weights_from_tensors(list(weights.items()))  # the engine's own load
                assert (await engine.generate(prompts, params)).response_ids == ours, f"update {step}"
                served.append(ours)
            assert served[0] != served[1] != served[2]  # each update changed what is served
            assert sender.generation == 1  # one generation of buffers: the same memory every time
            if backend == "vllm":
                [counts] = await engine.impl._worker_call("skyrl_replayed_loads")
                assert counts == {"recorded": 1, "replayed": 2, "refused": None}
            sender.close()
        finally:
            await engine.teardown()

    asyncio.run(scenario())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_nccl_broadcast_into_a_real_engine_on_the_other_gpu(backend, model_dir):
    """The trainer on GPU 0 broadcasts into an engine process on GPU 1, atomically and (where the
    backend loads packed buckets) streamed. Each time the engine serves what it serves after the
    same weights arrive through shared memory, and not what it served before."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    dtype = "bfloat16" if backend == "sglang" else "float32"  # SGLang 0.5.17's RMSNorm has no float32
    # The engine runs in its own process, out of reach of scripts/gpu/with_engine_defaults.py: it
    # gets the same per-backend defaults (SGLang's kernels on the GPU machine) as options.
    defaults = json.loads(os.environ.get("SKYRL_ENGINE_DEFAULTS", "{}")).get(backend, {})
    server = ServerProcess(backend, model_dir, env={"CUDA_VISIBLE_DEVICES": "1"},
                           options={**defaults, "dtype": dtype, "gpu_memory_utilization": 0.3})
    engine = connect_engine(server.wait_ready(), _owned_server=server)
    params = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True}
    prompts = [[5, 6, 7, 8], [100, 42, 17]]

    async def greedy() -> list[list[int]]:
        return (await engine.generate(prompts, params)).response_ids

    async def scenario():
        from transformers import AutoModelForCausalLM

        if backend == "sglang" and CUMEM_ENV not in os.environ:
            # SGLang runs its scheduler with NCCL_CUMEM_ENABLE=0 and this trainer with NCCL's default
            # (1): the ranks could not connect, and the engine says so before joining. (Run with
            # NCCL_CUMEM_ENABLE=0 to test the transfer itself.)
            with pytest.raises(WeightUpdateError, match=f"{CUMEM_ENV}=1 but SGLang's scheduler runs with 0"):
                await connect_broadcast(engine, device="cuda:0", timeout_s=60)
            return
        state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        applies = ["atomic"] + (["streamed"] if backend != "sglang" else [])
        served = await greedy()
        for seed, apply in enumerate(applies, start=1):
            g = torch.Generator().manual_seed(seed)
            weights = {n: (t + 0.5 * t.std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)).to("cuda:0")
                       for n, t in state.items()}
            sender = await connect_broadcast(engine, device="cuda:0", timeout_s=60, apply=apply,
                                             group_name=f"to_{backend}_{apply}")
            try:
                assert sender.layout == ("per_tensor" if backend == "sglang" else "packed")
                await sync_weights(engine, weights, "broadcast", sender=sender, bucket_bytes=64 * 1024)
            finally:
                sender.close()
            broadcast_out = await greedy()
            assert broadcast_out != served, f"{apply}: the engine still serves the previous weights"
            await sync_weights(engine, {n: t.cpu() for n, t in weights.items()}, "shared_memory")
            assert await greedy() == broadcast_out, f"{apply}: broadcast and shared memory disagree"
            served = broadcast_out
        if backend == "sglang":  # its native receiver takes one tensor per broadcast: refused up front
            with pytest.raises(WeightUpdateError, match="natively"):
                await connect_broadcast(engine, device="cuda:0", apply="streamed")

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.teardown())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_a_trainer_sharded_over_two_gpus_syncs_by_cuda_ipc_and_nccl(backend, model_dir):
    """Two trainer ranks, one per GPU (NCCL), hold the tiny model sharded with FSDP2 and sync it into an
    engine process on GPU 1: by CUDA IPC (the ranks gather into the sending rank's buffers over NCCL),
    shared memory, and NCCL broadcast (atomic, and streamed where the backend loads packed buckets).
    After each, the engine serves what it serves after the same weights arrive unsharded."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    dtype = "bfloat16" if backend == "sglang" else "float32"  # the trainer's float32 is converted on the way
    defaults = json.loads(os.environ.get("SKYRL_ENGINE_DEFAULTS", "{}")).get(backend, {})
    # SGLang's scheduler runs NCCL with NCCL_CUMEM_ENABLE=0: the trainer's ranks must too.
    nccl = {CUMEM_ENV: "0"} if backend == "sglang" else {}
    engine = launch_engine(backend, model_dir, env={"CUDA_VISIBLE_DEVICES": "1", **nccl},
                           **{**defaults, "dtype": dtype, "gpu_memory_utilization": 0.3})
    try:
        first, second = sharded_trainer.launch([engine], model_dir, device="cuda", env=nccl, timeout_s=600)
    finally:
        asyncio.run(engine.teardown())
    assert [c["strategy"] for c in first["cases"]][:3] == ["cuda_ipc", "shared_memory", "broadcast"]
    for case, other in zip(first["cases"], second["cases"], strict=True):
        assert case["versions"] == other["versions"] == [case["unsharded_versions"][0] - 1], case["strategy"]
        [sharded], [unsharded] = case["sharded"], case["unsharded"]
        assert sharded["tokens"] == unsharded["tokens"], case
    for result in (first, second):
        assert "rank 1: strategy" in result["failures"]["strategy"]["problems"]
        assert result["failures"]["engine_refuses"]["type"] == "WeightUpdateError"
