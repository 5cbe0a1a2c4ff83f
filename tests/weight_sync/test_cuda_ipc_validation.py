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
