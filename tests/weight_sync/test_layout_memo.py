"""A receiver reuses the views of the last validated layout only for exactly that layout, in exactly
the same buffers."""

from __future__ import annotations

import copy

import torch
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.chunks import plan
from skyrl_backends.weight_sync.layout_memo import LayoutMemo


def _request(bucket_bytes: int = 1024, ipc: str = "a") -> WeightUpdateRequest:
    weights = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    layout = plan(weights, bucket_bytes=bucket_bytes)
    payload = {"buckets": [{"ipc": {"handle": ipc}, **m.to_json()} for m in layout.buckets]}
    return WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", payload)


def test_same_layout_in_the_same_buffers_reuses_the_views() -> None:
    memo = LayoutMemo(volatile=("ipc",))
    request = _request()
    buffers = [torch.zeros(512, dtype=torch.uint8)]
    pairs = [("w", buffers[0][:256]), ("b", buffers[0][256:288])]
    assert not memo.matches(request)
    memo.remember(request, buffers, pairs)
    again = _request(ipc="b")  # another share of the same buffers: only the volatile field differs
    assert memo.matches(again) and memo.views(buffers) is pairs
    assert memo.views([torch.zeros(512, dtype=torch.uint8)]) is None  # other buffers
    as_tuples = WeightUpdateRequest(tuple(again.names), tuple(again.dtypes), tuple(again.shapes), again.strategy,
                                    again.payload)
    assert memo.matches(as_tuples)  # the same layout given as tuples (the request keeps lists)


def test_any_change_of_layout_is_not_a_match() -> None:
    memo = LayoutMemo(volatile=("ipc",))
    request = _request()
    memo.remember(request, [None], [])
    moved = copy.deepcopy(request)
    moved.payload["buckets"][0]["tensors"][1]["offset"] += 4
    renamed = WeightUpdateRequest(["v", "b"], request.dtypes, request.shapes, "cuda_ipc", request.payload)
    reshaped = WeightUpdateRequest(request.names, request.dtypes, [(4, 16), (8,)], "cuda_ipc", request.payload)
    for other in (moved, renamed, reshaped, _request(bucket_bytes=128)):
        assert not memo.matches(other)
    memo.forget()
    assert not memo.matches(request)


def test_a_planned_layout_matches_only_the_same_plan() -> None:
    memo = LayoutMemo(volatile=("ipc",))
    layout = plan({"w": torch.zeros(8, 8), "b": torch.zeros(8)}, bucket_bytes=1024)

    def planned(alignment: int, ipc: str = "a") -> WeightUpdateRequest:
        payload = layout.payload([{"ipc": {"handle": ipc}, "nbytes": b.nbytes} for b in layout.buckets])
        payload["plan"]["alignment"] = alignment
        return WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "cuda_ipc", payload)

    memo.remember(planned(256), [None], [])
    assert memo.matches(planned(256, ipc="b"))
    # The same buckets' JSON under another plan puts the tensors elsewhere: not the remembered layout
    assert not memo.matches(planned(512))
    assert not memo.matches(_request())
