"""Broadcast over gloo between a trainer (this process) and engine-side peers in other processes."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import threading

import native_broadcast_peer
import pytest
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.broadcast import BroadcastSender
from skyrl_backends.weight_sync.chunks import plan
from skyrl_backends.weight_sync.manifest import request_to_json


def _weights(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(40, 16, generator=g), "layer.weight": torch.randn(16, 16, generator=g),
            "layer.bias": torch.randn(16, generator=g).to(torch.bfloat16), "steps": torch.arange(5)}


def _sums(weights, dtypes=None) -> dict[str, float]:
    return {n: float(t.to(getattr(torch, dtypes[n]) if dtypes else t.dtype).double().sum()) for n, t in weights.items()}


def _join(sender: BroadcastSender, peers: list) -> None:
    joiner = threading.Thread(target=sender.join)
    joiner.start()
    for peer in peers:
        peer.start()
    joiner.join(120)
    assert sender.group is not None


def test_per_tensor_layout_meets_engines_that_join_natively():
    """The trainer's group is laid out like torch's own, so an engine joining with SGLang-style native
    code (no skyrl code) lands in it and receives every tensor."""
    weights = _weights()
    layout = plan(weights, dtype_for={"embed.weight": "bfloat16"})
    specs = [[n, d, list(s)] for n, d, s in zip(layout.names, layout.dtypes, layout.shapes, strict=False)]
    sender = BroadcastSender(2, "127.0.0.1", 0, "gloo", "native_group", layout="per_tensor", timeout_s=120)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=native_broadcast_peer.join_like_native_engines,
                       args=(child, "127.0.0.1", sender.master_port, 1, 2, "native_group", specs))
    _join(sender, [peer])
    sender.send(layout)
    got = json.loads(parent.recv_bytes())
    peer.join(60)
    dtypes = dict(zip(layout.names, layout.dtypes, strict=False))
    assert got == pytest.approx(list(_sums(weights, dtypes).values()))
    sender.close()


def test_packed_and_per_tensor_layouts_into_skyrl_receivers_of_two_processes():
    weights = _weights()
    sender = BroadcastSender(3, "127.0.0.1", 0, "gloo", "two_peers", timeout_s=120)
    ctx = mp.get_context("spawn")
    pipes, peers = [], []
    for offset in (1, 2):
        parent, child = ctx.Pipe()
        info = {**sender.init_info(offset).__dict__}
        peers.append(ctx.Process(target=native_broadcast_peer.receive_with_skyrl, args=(child, info)))
        pipes.append(parent)
    _join(sender, peers)
    assert [p.recv_bytes() for p in pipes] == [b"joined", b"joined"]
    try:
        # The second update of a mode has the first one's layout (the receivers reuse its views),
        # the third a new one (validated and sliced afresh); each carries other values. Streamed
        # updates load bucket by bucket through a ring of two buffers and hold nothing more.
        for layout_name, apply, bucket_bytes, seed in (
                ("packed", "atomic", 2048, 3), ("packed", "atomic", 2048, 4), ("packed", "atomic", 1024, 5),
                ("per_tensor", "atomic", 2048, 6), ("packed", "streamed", 1024, 7), ("packed", "streamed", 1024, 8),
                ("packed", "streamed", 768, 9), ("packed", "atomic", 2048, 10)):
            sender.layout, sender.apply = layout_name, apply
            weights = _weights(seed)
            layout = plan(weights, bucket_bytes=bucket_bytes)
            request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "broadcast",
                                          sender.payload(layout))
            for pipe in pipes:
                pipe.send_bytes(json.dumps(request_to_json(request)).encode())
            sender.send(layout)
            sizes = [b.nbytes for b in layout.buckets]
            for pipe in pipes:
                reply = json.loads(pipe.recv_bytes())
                assert reply["sums"] == pytest.approx(_sums(weights))
                if apply == "streamed":
                    assert len(sizes) >= 3 and reply["loads"] == len(sizes)
                    assert reply["staging_bytes"] == 2 * max(sizes)
                elif layout_name == "packed":
                    assert reply["loads"] == 1 and reply["staging_bytes"] == sum(sizes)
        # A request for another group is refused by every receiver before it waits for any bytes.
        request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "broadcast",
                                      {**sender.payload(layout), "group_name": "someone_else"})
        for pipe in pipes:
            pipe.send_bytes(json.dumps(request_to_json(request)).encode())
            assert "payload.group_name" in json.loads(pipe.recv_bytes())["error"]
    finally:
        for pipe in pipes:
            pipe.send_bytes(b"stop")
        for peer in peers:
            peer.join(60)
        sender.close()


def test_bad_sender_settings_are_named():
    with pytest.raises(WeightUpdateError) as info:
        BroadcastSender(2, backend="mpi")
    assert "backend" in info.value.problems
    with pytest.raises(WeightUpdateError) as info:
        BroadcastSender(2, layout="zigzag")
    assert "layout" in info.value.problems
    with pytest.raises(WeightUpdateError) as info:
        BroadcastSender(2, apply="eventually")
    assert "eventually" in info.value.problems["apply"]
    with pytest.raises(WeightUpdateError) as info:  # streamed loads packed buckets as they arrive
        BroadcastSender(2, layout="per_tensor", apply="streamed")
    assert "layout='packed'" in info.value.problems["apply"]


def test_nccl_ranks_that_share_gpu_memory_differently_are_refused_before_joining():
    """SGLang's scheduler runs NCCL with NCCL_CUMEM_ENABLE=0; a trainer on NCCL's default cannot
    reach it (CUDA 'invalid argument' at the first broadcast), so the engine side refuses up front."""
    from skyrl_backends.types import WeightSyncInitInfo
    from skyrl_backends.weight_sync.nccl_transport import INIT_INFO_KEY, check_matches_trainer, cumem_setting

    assert cumem_setting({}) == "1" and cumem_setting({"NCCL_CUMEM_ENABLE": "0"}) == "0"
    info = WeightSyncInitInfo(master_addr="127.0.0.1", master_port=1234, rank_offset=1, world_size=2,
                              group_name="g", backend="nccl", strategy="broadcast", extra={INIT_INFO_KEY: "1"})
    check_matches_trainer(info, "an engine", environ={})
    check_matches_trainer(info, "an engine", environ={"NCCL_CUMEM_ENABLE": "1"})
    with pytest.raises(WeightUpdateError) as error:
        check_matches_trainer(info, "SGLang's scheduler", environ={"NCCL_CUMEM_ENABLE": "0"})
    why = error.value.problems["NCCL_CUMEM_ENABLE"]
    assert "trainer's NCCL runs with NCCL_CUMEM_ENABLE=1 but SGLang's scheduler runs with 0" in why
    assert "Set NCCL_CUMEM_ENABLE=0 in the trainer's environment" in why
    # A trainer that did not say (not a skyrl sender), and gloo, are not checked.
    check_matches_trainer(dataclasses.replace(info, extra={}), "an engine", environ={"NCCL_CUMEM_ENABLE": "0"})
    check_matches_trainer(dataclasses.replace(info, backend="gloo"), "an engine", environ={"NCCL_CUMEM_ENABLE": "0"})
    # The trainer puts its own setting in what it hands the engines (NCCL only).
    for backend, expected in (("gloo", None), ("nccl", cumem_setting())):
        sender = BroadcastSender(2, backend=backend)
        assert sender.init_info(1).extra.get(INIT_INFO_KEY) == expected
        sender.close()
