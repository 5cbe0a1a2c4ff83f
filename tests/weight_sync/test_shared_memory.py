"""Shared-memory transport: the receiver maps what the sender wrote, and refuses broken transfers
before yielding anything (the engine-level atomicity is tested against real engines in
tests/weight_sync)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync import SharedMemorySender, make_receiver, receive_named_tensors
from skyrl_backends.weight_sync.chunks import plan
from skyrl_backends.weight_sync.manifest import spelled_out


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(6)} | {
        "norm.weight": torch.ones(16, dtype=torch.bfloat16)}


def _send(sender: SharedMemorySender, weights, bucket_bytes=2048) -> WeightUpdateRequest:
    layout = plan(weights, bucket_bytes)
    return WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "shared_memory", sender.write(layout))


def test_round_trip_gives_the_sent_values():
    weights = _weights()
    with SharedMemorySender() as sender:
        request = _send(sender, weights)
        assert len(request.payload["buckets"]) > 1
        got = dict(receive_named_tensors(request, device="cpu"))
    assert set(got) == set(weights)
    for name, tensor in weights.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def test_segments_are_reused_for_the_same_layout_and_unlinked_on_close():
    weights = _weights()
    sender = SharedMemorySender()
    first = [b["segment"] for b in _send(sender, weights).payload["buckets"]]
    weights2 = {k: v * 2 for k, v in weights.items()}
    request = _send(sender, weights2)
    assert [b["segment"] for b in request.payload["buckets"]] == first
    got = dict(receive_named_tensors(request, device="cpu"))
    assert torch.equal(got["layers.0.weight"], weights2["layers.0.weight"])
    sender.close()
    if os.path.isdir("/dev/shm"):
        assert not any(os.path.exists(f"/dev/shm/{name}") for name in first)
    with pytest.raises(WeightUpdateError) as info:
        receive_named_tensors(request, device="cpu")
    assert "does not exist" in info.value.problems["payload.buckets[0].segment"]


def test_a_repeated_layout_reuses_the_views_but_every_segment_is_checked_again():
    from multiprocessing import shared_memory

    weights = _weights()
    with SharedMemorySender() as sender:
        request = _send(sender, weights)
        first = list(receive_named_tensors(request, device="cpu"))
        again = list(receive_named_tensors(_send(sender, weights), device="cpu"))
        assert all(a[1] is b[1] for a, b in zip(first, again, strict=True))  # the views made last time

        # The segment replaced under the same name (another inode): its new bytes are read, not the
        # old mapping's.
        name = request.payload["buckets"][0]["segment"]
        nbytes = request.payload["buckets"][0]["nbytes"]
        shared_memory.SharedMemory(name=name).unlink()
        replacement = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        try:
            replacement.buf[:nbytes] = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
            got = dict(receive_named_tensors(request, device="cpu"))
            entry = spelled_out(request).payload["buckets"][0]["tensors"][0]
            expected = torch.frombuffer(bytearray(replacement.buf[entry["offset"]:nbytes]), dtype=torch.uint8)
            assert torch.equal(got[entry["name"]].reshape(-1).view(torch.uint8),
                               expected[:got[entry["name"]].numel() * got[entry["name"]].element_size()])

            # ... and one cut short is refused, though the layout is the one remembered.
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            os.ftruncate(fd, 1)
            os.close(fd)
            with pytest.raises(WeightUpdateError) as info:
                receive_named_tensors(request, device="cpu")
            assert "truncated" in info.value.problems["payload.buckets[0].segment"]
        finally:
            replacement.close()
            replacement.unlink()


def test_truncated_segment_is_refused_before_anything_is_yielded():
    with SharedMemorySender() as sender:
        request = spelled_out(_send(sender, _weights()))
        bad = copy.deepcopy(request.payload)
        bad["buckets"][-1]["nbytes"] += 1 << 20  # the manifest claims more bytes than the segment holds
        tampered = WeightUpdateRequest(request.names, request.dtypes, request.shapes, "shared_memory", bad)
        with pytest.raises(WeightUpdateError) as info:
            receive_named_tensors(tampered, device="cpu")
    last = f"payload.buckets[{len(bad['buckets']) - 1}].segment"
    assert "truncated" in info.value.problems[last]


def test_offset_out_of_range_names_the_tensor():
    with SharedMemorySender() as sender:
        request = spelled_out(_send(sender, _weights()))
        bad = copy.deepcopy(request.payload)
        entry = bad["buckets"][0]["tensors"][0]
        entry["offset"] = bad["buckets"][0]["nbytes"]
        tampered = WeightUpdateRequest(request.names, request.dtypes, request.shapes, "shared_memory", bad)
        with pytest.raises(WeightUpdateError) as info:
            receive_named_tensors(tampered, device="cpu")
    assert "outside its bucket" in info.value.problems[entry["name"]]


@pytest.mark.parametrize("name", ["../../etc/passwd", "psm_123", "skyrl_ws_XYZ", 42])
def test_only_segments_of_our_own_pattern_are_opened(name):
    with SharedMemorySender() as sender:
        request = _send(sender, _weights())
        bad = copy.deepcopy(request.payload)
        bad["buckets"][0]["segment"] = name
        tampered = WeightUpdateRequest(request.names, request.dtypes, request.shapes, "shared_memory", bad)
        with pytest.raises(WeightUpdateError) as info:
            receive_named_tensors(tampered, device="cpu")
    assert "not a segment name" in info.value.problems["payload.buckets[0].segment"]


def test_unknown_strategy_and_missing_communicator_are_explained():
    request = WeightUpdateRequest(["a"], ["float32"], [(1,)], "carrier_pigeon", {"buckets": []})
    with pytest.raises(WeightUpdateError, match="carrier_pigeon"):
        receive_named_tensors(request, device="cpu")
    request = WeightUpdateRequest(["a"], ["float32"], [(1,)], "broadcast", {"buckets": []})
    with pytest.raises(WeightUpdateError, match="init_weight_update_communicator"):
        receive_named_tensors(request, device="cpu")


def test_colocated_strategies_need_no_communicator_and_bad_init_info_is_named():
    assert make_receiver(WeightSyncInitInfo("127.0.0.1", 1234, 1, 2, strategy="shared_memory"), "cpu") is None
    with pytest.raises(WeightUpdateError) as info:
        make_receiver(WeightSyncInitInfo("127.0.0.1", 1234, 0, 1, backend="mpi"), "cpu")
    assert {"backend", "world_size", "rank_offset"} <= set(info.value.problems)
