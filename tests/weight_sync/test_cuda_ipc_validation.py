"""CUDA IPC payloads are validated field by field before any handle is opened. These checks run
without a GPU; opening real handles is exercised on the GPU machine (core/benchmarks)."""

from __future__ import annotations

import base64

import pytest
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import cuda_ipc


def _request(**ipc_changes) -> WeightUpdateRequest:
    ipc = {"device_uuid": "GPU-0000", "handle": base64.b64encode(b"h" * 64).decode(), "storage_nbytes": 1024,
           "storage_offset": 0, "tensor_offset": 0, "ref_counter_handle": base64.b64encode(b"r" * 8).decode(),
           "ref_counter_offset": 0, "event_handle": None, "event_sync_required": False}
    ipc.update(ipc_changes)
    bucket = {"ipc": ipc, "nbytes": 512, "tensors": [{"name": "w", "dtype": "float32", "shape": [128], "offset": 0}]}
    return WeightUpdateRequest(["w"], ["float32"], [(128,)], "cuda_ipc", {"buckets": [bucket]})


@pytest.mark.parametrize("changes, field, words", [
    ({"handle": "not base64!"}, "payload.buckets[0].ipc.handle", "base64"),
    ({"handle": 12}, "payload.buckets[0].ipc.handle", "base64"),
    ({"storage_nbytes": -1}, "payload.buckets[0].ipc.storage_nbytes", "non-negative"),
    ({"tensor_offset": True}, "payload.buckets[0].ipc.tensor_offset", "non-negative"),
    ({"storage_nbytes": 256}, "payload.buckets[0].ipc", "holds 256 bytes"),
    ({"tensor_offset": 768}, "payload.buckets[0].ipc", "needs [768, 1280)"),
    ({}, "payload.device_uuid", "not visible"),  # no such GPU here: refused before opening anything
])
def test_bad_handle_fields_are_named(changes, field, words):
    with pytest.raises(WeightUpdateError) as info:
        cuda_ipc.receive(_request(**changes), "cpu")
    assert words in info.value.problems[field], info.value.problems


def test_a_bucket_without_its_handle_is_refused():
    request = _request()
    del request.payload["buckets"][0]["ipc"]
    with pytest.raises(WeightUpdateError) as info:
        cuda_ipc.receive(request, "cpu")
    assert "ipc" in info.value.problems["payload.buckets[0]"]


@pytest.mark.parametrize("changes, field, words", [
    ({"sender": "../../x", "generation": 1}, "payload.buckets[0].ipc.sender", "hex digits"),
    ({"generation": 1}, "payload.buckets[0].ipc.sender", "hex digits"),
    ({"sender": "ab" * 8, "generation": -1}, "payload.buckets[0].ipc.generation", "non-negative"),
    ({"sender": "ab" * 8, "generation": "2"}, "payload.buckets[0].ipc.generation", "non-negative"),
])
def test_bad_sender_generation_fields_are_named(changes, field, words):
    with pytest.raises(WeightUpdateError) as info:
        cuda_ipc.receive(_request(**changes), "cpu")
    assert words in info.value.problems[field], info.value.problems


class Opener:
    """Test double for opening a handle: counts the calls and returns a fresh buffer."""

    def __init__(self, nbytes: int = 64) -> None:
        self.calls, self.nbytes = 0, nbytes

    def __call__(self):
        import torch

        self.calls += 1
        return torch.zeros(self.nbytes, dtype=torch.uint8)


def test_a_generation_is_opened_once_and_reused():
    shares, opener = cuda_ipc.OpenedShares(), Opener()
    first = shares.get("a" * 16, 1, "h0", 64, "payload.buckets[0]", opener)
    assert shares.get("a" * 16, 1, "h0", 64, "payload.buckets[0]", opener) is first
    shares.get("a" * 16, 1, "h1", 64, "payload.buckets[1]", opener)  # another bucket of the same generation
    assert opener.calls == 2 and shares.opened == 2


def test_a_newer_generation_drops_the_older_buffers_and_an_older_one_is_refused():
    shares, opener = cuda_ipc.OpenedShares(), Opener()
    old = shares.get("a" * 16, 1, "h0", 64, "where", opener)
    new = shares.get("a" * 16, 2, "h0", 64, "where", opener)  # same handle text, reallocated: opened anew
    assert new is not old and opener.calls == 2 and shares.generation("a" * 16) == 2
    with pytest.raises(WeightUpdateError) as info:
        shares.get("a" * 16, 1, "h0", 64, "payload.buckets[0]", opener)
    assert "reallocated its buffers" in info.value.problems["payload.buckets[0].ipc.generation"]
    assert opener.calls == 2  # nothing opened for the stale request


def test_a_size_other_than_the_opened_buckets_is_refused_and_other_senders_are_let_go():
    shares, opener = cuda_ipc.OpenedShares(), Opener(64)
    shares.get("a" * 16, 1, "h0", 64, "where", opener)
    with pytest.raises(WeightUpdateError, match="holds 64 bytes"):
        shares.get("a" * 16, 1, "h0", 128, "payload.buckets[0]", opener)
    shares.get("b" * 16, 5, "h0", 64, "where", opener)
    shares.keep_only({"b" * 16})
    assert shares.generation("a" * 16) is None and shares.generation("b" * 16) == 5


def test_only_buckets_kept_for_a_generation_are_replayable():
    """keeps_buffers: a request's buffers are the same memory at every update only if every bucket's
    handle names its sender and generation (what the engines' replayed load needs)."""
    assert not cuda_ipc.keeps_buffers(_request())  # an unnamed handle: a buffer of one update
    assert cuda_ipc.keeps_buffers(_request(sender="ab" * 8, generation=3))
    assert not cuda_ipc.keeps_buffers(_request(sender="ab" * 8))
    shared = WeightUpdateRequest(["w"], ["float32"], [(128,)], "shared_memory", {"buckets": []})
    assert not cuda_ipc.keeps_buffers(shared)
