"""A sender that adopts the trainer's weights: the parameters live in the send buckets, so a sync
copies nothing on the trainer's side, and whatever left the buckets is still sent right. CPU, over
shared memory; the CUDA IPC sender shares the same code (chunks.adopt, Packer) and is proven on the
GPU in test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import SharedMemorySender, receive_named_tensors
from skyrl_backends.weight_sync.chunks import plan


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight  # tied, as Qwen2.5's small models are
        self.register_buffer("scale", torch.ones(8))


def _sync(sender: SharedMemorySender, weights, bucket_bytes: int = 512) -> dict[str, torch.Tensor]:
    layout = plan(weights, bucket_bytes)
    request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "shared_memory", sender.write(layout))
    return {name: tensor.clone() for name, tensor in receive_named_tensors(request, device="cpu")}


def _in_segments(tensor: torch.Tensor, sender: SharedMemorySender, bucket_bytes: int = 512) -> bool:
    start = tensor.data_ptr()
    return any(b.data_ptr() <= start < b.data_ptr() + b.numel() for b in sender.allocate(plan(TinyLM(), bucket_bytes)))


def test_an_adopted_module_trains_in_the_buckets_and_syncs_without_a_copy():
    torch.manual_seed(0)
    model = TinyLM()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with SharedMemorySender() as sender:
        views = sender.adopt(model, bucket_bytes=512)
        assert set(views) == set(before) - {"head.weight"}  # the tied alias travels once
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name  # adopting changes no value
        assert all(_in_segments(p, sender) for p in model.parameters())
        assert model.head.weight is model.embed.weight  # still tied
        # A training step, in place, as optimizers do.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model.head(model.layers(model.embed(torch.tensor([1, 2, 3])))).square().mean()
        loss.backward()
        optimizer.step()
        got = _sync(sender, model)
        assert sender.copied == 0
        for name, tensor in model.state_dict().items():
            if name != "head.weight":
                assert torch.equal(got[name], tensor), name
        assert not torch.equal(got["layers.0.weight"], before["layers.0.weight"])


def test_a_tensor_that_left_the_buckets_is_copied_again():
    model = TinyLM()
    with SharedMemorySender() as sender:
        sender.adopt(model, bucket_bytes=512)
        model.layers[1].weight = torch.nn.Parameter(torch.full((8, 8), 3.0))  # replaced, not updated in place
        with torch.no_grad():
            model.layers[0].bias.data = torch.full((8,), -1.0)  # re-pointed
        got = _sync(sender, model)
        assert sender.copied == 2
        assert torch.equal(got["layers.1.weight"], torch.full((8, 8), 3.0))
        assert torch.equal(got["layers.0.bias"], torch.full((8,), -1.0))


def test_adopted_mappings_are_synced_through_the_returned_views():
    weights = {"a": torch.randn(16, 4), "b": torch.randn(4)}
    with SharedMemorySender() as sender:
        views = sender.adopt(weights, bucket_bytes=256)
        views["a"].mul_(2)
        got = _sync(sender, views, bucket_bytes=256)
        assert sender.copied == 0 and torch.equal(got["a"], views["a"]) and torch.equal(got["b"], weights["b"])
        # Another layout (a bigger bucket): new segments, and the adopted tensors are copied into them.
        got = _sync(sender, views, bucket_bytes=4096)
        assert sender.copied == 2 and torch.equal(got["a"], views["a"])


def test_an_adopted_tensor_viewed_otherwise_in_place_is_refused_by_name_and_nothing_is_written():
    weights = {"a": torch.arange(16.0).reshape(4, 4), "b": torch.arange(4.0)}
    with SharedMemorySender() as sender:
        views = sender.adopt(weights, bucket_bytes=256)
        views["b"].add_(1)  # trained in place: still adopted
        views["a"].t_()  # same address, dtype and shape; no longer contiguous
        replaced = {**views, "b": torch.full((4,), 7.0)}  # left the buckets: would be copied
        layout = plan(replaced, 256)
        with pytest.raises(WeightUpdateError) as info:
            sender.write(layout)
        assert set(info.value.problems) == {"a"} and "adopt" in info.value.problems["a"]
        # Refused before any copy: the adopted tensors (and the buckets they live in) are as they were.
        assert torch.equal(views["a"], torch.arange(16.0).reshape(4, 4).t())
        assert torch.equal(views["b"], torch.arange(4.0) + 1)
        views["a"].t_()
        got = _sync(sender, views, bucket_bytes=256)  # viewed as adopted again: synced, nothing copied
        assert sender.copied == 0 and torch.equal(got["a"], torch.arange(16.0).reshape(4, 4))


def test_a_tensor_inside_any_of_several_buffers_is_found_and_one_outside_them_is_copied():
    weights = {name: torch.arange(16.0).reshape(4, 4) + i for i, name in enumerate("abcd")}
    with SharedMemorySender() as sender:
        views = sender.adopt(weights, bucket_bytes=64)  # a bucket (a segment) per tensor
        assert len(sender.allocate(plan(views, 64))) == 4
        for name in "abcd":  # each bucket's tensor transposed in place is found in its own buffer
            views[name].t_()
            with pytest.raises(WeightUpdateError) as info:
                sender.write(plan(views, 64))
            assert set(info.value.problems) == {name}
            views[name].t_()
        outside = {**views, "c": torch.full((4, 4), 5.0)}
        got = _sync(sender, outside, bucket_bytes=64)
        assert sender.copied == 1 and torch.equal(got["c"], torch.full((4, 4), 5.0))


def test_adopted_tensors_synced_in_another_order_are_refused():
    weights = {"a": torch.zeros(8), "b": torch.ones(8)}
    with SharedMemorySender() as sender:
        views = sender.adopt(weights, bucket_bytes=256)
        with pytest.raises(WeightUpdateError) as info:  # the same bucket size, the places swapped
            sender.write(plan({"b": views["b"], "a": views["a"]}, 256))
        assert set(info.value.problems) == {"a", "b"}
        assert torch.equal(views["a"], torch.zeros(8)) and torch.equal(views["b"], torch.ones(8))


def test_adopting_refuses_a_conversion_and_names_the_tensor():
    with SharedMemorySender() as sender, pytest.raises(WeightUpdateError) as info:
        sender.adopt({"a": torch.zeros(4), "b": torch.zeros(4, dtype=torch.bfloat16)}, dtype_for="bfloat16")
    assert set(info.value.problems) == {"a"} and "float32 but is sent as bfloat16" in info.value.problems["a"]


def test_planning_the_same_layout_again_gives_the_same_buckets():
    weights = {"a": torch.zeros(16, 4), "b": torch.zeros(4)}
    first, again = plan(weights, 256), plan(dict(weights), 256)
    assert all(x is y for x, y in zip(first.buckets, again.buckets, strict=True))
    other = plan({"a": torch.zeros(16, 4), "b": torch.zeros(5)}, 256)
    assert other.buckets[-1] is not first.buckets[-1] and other.buckets[-1].tensors[-1].shape == (5,)
