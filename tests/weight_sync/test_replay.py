"""ReplayedLoad: an engine's load recorded once and replayed as one fused copy.

The model here is a test double with a loader shaped like vLLM's: checkpoint names mapped onto a
fused ``qkv`` parameter by narrowing it, a renamed parameter, and one loaded as it is. Every replay
is checked against the same load run on a fresh copy of the model (the oracle), with new values in
the send buffer each time, so a replay that copied stale or misplaced bytes fails.
"""

from __future__ import annotations

import pytest
import torch
from skyrl_backends.weight_sync.replay import ReplayedLoad

HIDDEN = 8
SPECS = [("q.weight", (HIDDEN, HIDDEN)), ("k.weight", (HIDDEN // 2, HIDDEN)), ("v.weight", (HIDDEN // 2, HIDDEN)),
         ("out.weight", (HIDDEN, HIDDEN)), ("norm.weight", (HIDDEN,))]


class FusedModel(torch.nn.Module):
    """q, k and v of a checkpoint live in one fused parameter, as in vLLM's QKVParallelLinear."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(2 * HIDDEN, HIDDEN))
        self.o_proj = torch.nn.Parameter(torch.zeros(HIDDEN, HIDDEN))
        self.norm = torch.nn.Parameter(torch.zeros(HIDDEN))
        self.register_buffer("steps", torch.zeros(1))

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        offsets = {"q": (0, HIDDEN), "k": (HIDDEN, HIDDEN // 2), "v": (HIDDEN + HIDDEN // 2, HIDDEN // 2)}
        with torch.no_grad():
            for name, tensor in named:
                module = name.split(".")[0]
                if module in offsets:
                    start, size = offsets[module]
                    self.qkv.data.narrow(0, start, size).copy_(tensor)
                elif module == "out":
                    self.o_proj.data.copy_(tensor)
                else:
                    self.norm.data.copy_(tensor)

    def owners(self) -> list[torch.Tensor]:
        return [*self.parameters(), *self.buffers()]


class SendBuffer:
    """One persistent bucket holding every tensor of SPECS, as a colocated sender's is."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]] = SPECS) -> None:
        self.bucket = torch.zeros(sum(torch.Size(shape).numel() for _, shape in specs))
        self.named: list[tuple[str, torch.Tensor]] = []
        offset = 0
        for name, shape in specs:
            n = torch.Size(shape).numel()
            self.named.append((name, self.bucket[offset:offset + n].view(shape)))
            offset += n

    def fill(self, seed: int) -> None:
        self.bucket.copy_(torch.randn(self.bucket.shape, generator=torch.Generator().manual_seed(seed)))


def loaded_by_the_model_itself(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    model = FusedModel()
    model.load_weights(named)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_loaded(model: FusedModel, named: list[tuple[str, torch.Tensor]]) -> None:
    expected = loaded_by_the_model_itself(named)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=0, msg=name)


def test_a_load_is_recorded_once_then_replayed_with_every_new_value() -> None:
    model, send = FusedModel(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    for step in range(4):
        send.fill(step)  # the trainer's new weights, written into the same buffer
        assert replayed.load(send.named, model.load_weights) is (step > 0)
        assert_loaded(model, send.named)
    assert (replayed.recorded, replayed.replayed, replayed.refused) == (1, 3, None)


def test_other_received_memory_is_recorded_again() -> None:
    model, first, second = FusedModel(), SendBuffer(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    first.fill(0)
    replayed.load(first.named, model.load_weights)
    second.fill(1)  # a new sender generation: new buffers
    assert replayed.load(second.named, model.load_weights) is False
    assert_loaded(model, second.named)
    second.fill(2)
    assert replayed.load(second.named, model.load_weights) is True
    assert_loaded(model, second.named)


def test_a_partial_update_is_its_own_recording() -> None:
    model, send = FusedModel(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    send.fill(0)
    replayed.load(send.named, model.load_weights)
    send.fill(1)
    partial = send.named[:2]  # q and k only: v, out and norm keep the values of the first load
    assert replayed.load(partial, model.load_weights) is False
    expected = FusedModel()
    expected.load_weights([(n, t.clone()) for n, t in send.named])
    send.fill(0)
    expected.load_weights(send.named[2:])  # what the full first load left in v, out and norm
    send.fill(1)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), dict(expected.named_parameters())[name].detach(), msg=name)


def reallocate_a_parameter(model: FusedModel) -> None:
    model.o_proj.data = torch.zeros(HIDDEN, HIDDEN)  # an engine that gave a parameter new storage


def rebuild_a_buffer(model: FusedModel) -> None:
    model.steps = torch.ones(1)  # e.g. a cache an engine rebuilds during a forward pass


def replace_a_parameter(model: FusedModel) -> None:
    model.norm = torch.nn.Parameter(torch.zeros(HIDDEN))  # a new object, not new storage for the old one


@pytest.mark.parametrize(("change", "replays"), [
    (reallocate_a_parameter, False),  # the recording would write the old storage
    (rebuild_a_buffer, True),  # the load does not write it
    (replace_a_parameter, False),
])
def test_what_the_engine_changed_since_the_recording_decides_whether_it_is_replayed(change, replays) -> None:
    model, send = FusedModel(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    send.fill(0)
    replayed.load(send.named, model.load_weights)
    change(model)
    send.fill(1)
    assert replayed.load(send.named, model.load_weights) is replays
    assert_loaded(model, send.named)  # the model's tensors now got the values, not the ones recorded


class Converting(FusedModel):
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights([(n, t.to(torch.float64).to(torch.float32)) for n, t in named])


class ScalingAfterwards(FusedModel):
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(named)
        with torch.no_grad():
            self.norm.mul_(2.0)


class WritingTwice(FusedModel):
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(named)
        with torch.no_grad():
            self.o_proj.data.copy_(named[0][1])  # q's values over out's: the order matters


class WritingOutside(FusedModel):
    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(named)
        spare = torch.empty(HIDDEN)
        spare.copy_(named[-1][1])
        self.kept = [spare]


class PaddedEmbedding(FusedModel):
    """Pads ``out`` with a zeroed row, as vLLM's and SGLang's embedding loaders pad the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.o_proj = torch.nn.Parameter(torch.full((HIDDEN + 1, HIDDEN), 7.0))

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights([(n, t) for n, t in named if not n.startswith("out")])
        with torch.no_grad():
            for name, tensor in named:
                if name.startswith("out"):
                    self.o_proj[:HIDDEN].data.copy_(tensor)
                    self.o_proj[HIDDEN:].data.fill_(0)


def test_a_load_that_zeroes_padding_rows_is_replayed_with_them() -> None:
    model, send = PaddedEmbedding(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    for step in range(3):
        send.fill(step)
        model.o_proj.data[HIDDEN:] = 5.0  # what a sleep that discarded the weights leaves behind
        assert replayed.load(send.named, model.load_weights) is (step > 0)
        reference = PaddedEmbedding()
        reference.load_weights(send.named)
        torch.testing.assert_close(model.o_proj.detach(), reference.o_proj.detach(), rtol=0, atol=0)


class ScalarFromItem(FusedModel):
    """Loads ``norm`` through ``.item()``, as a loader of one-element parameters may."""

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        super().load_weights([(n, t) for n, t in named if not n.startswith("norm")])
        with torch.no_grad():
            self.norm.data.fill_(dict(named)["norm.weight"][0].item())


@pytest.mark.parametrize(("model_class", "reason"), [
    (ScalarFromItem, ".item()"),
    (Converting, "computed during the load"),
    (ScalingAfterwards, "writes in place"),
    (WritingTwice, "same bytes"),
    (WritingOutside, "outside the model's parameters"),
])
def test_a_load_that_is_not_only_copies_of_received_memory_is_never_replayed(model_class: type[FusedModel],
                                                                             reason: str) -> None:
    model, send = model_class(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    for step in range(3):
        send.fill(step)
        assert replayed.load(send.named, model.load_weights) is False
        reference = model_class()
        reference.load_weights(send.named)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach(), dict(reference.named_parameters())[name].detach(), msg=name)
    assert reason in (replayed.refused or "")
    assert (replayed.recorded, replayed.replayed) == (1, 0)  # recorded once, then the load runs as it is


def test_forget_lets_go_of_the_received_memory() -> None:
    model, send = FusedModel(), SendBuffer()
    replayed = ReplayedLoad(model.owners)
    send.fill(0)
    replayed.load(send.named, model.load_weights)
    replayed.forget()
    send.fill(1)
    assert replayed.load(send.named, model.load_weights) is False
    assert replayed.recorded == 2
    assert_loaded(model, send.named)


def test_replaying_is_on_unless_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from skyrl_backends.weight_sync import replay

    monkeypatch.delenv(replay.ENV, raising=False)
    assert replay.enabled()
    monkeypatch.setenv(replay.ENV, "0")
    assert not replay.enabled()


def test_the_owners_of_a_model_are_every_parameter_and_buffer_of_every_submodule() -> None:
    from skyrl_backends.weight_sync.replay import parameters_and_buffers

    model = torch.nn.Module()
    model.body = FusedModel()
    model.head = torch.nn.Linear(HIDDEN, 2)
    model.head.weight = model.body.o_proj  # tied: one parameter under two names
    model.again = model.body  # one module under two names
    model.body.add_module("outer", model)  # a module inside itself
    model.register_module("empty", None)  # a None submodule, and below a None parameter and buffer
    model.body.register_parameter("none", None)
    model.body.register_buffer("nothing", None)
    model.head.register_buffer("scale", torch.ones(2))
    expected = {id(t) for t in [*model.parameters(), *model.buffers()]}
    owners = parameters_and_buffers(model)
    assert {id(t) for t in owners} == expected and len(expected) == 6


def test_the_owners_are_found_in_registrations_kept_in_mappings_that_are_not_dicts() -> None:
    import collections

    from skyrl_backends.weight_sync.replay import parameters_and_buffers

    model = torch.nn.Module()
    model.head = torch.nn.Linear(HIDDEN, 2)
    model.head.register_buffer("scale", torch.ones(2))
    # A framework may keep a module's registrations in a mapping of its own (no dict subclass).
    object.__setattr__(model.head, "_buffers", collections.UserDict(model.head._buffers))
    expected = {id(model.head.weight), id(model.head.bias), id(model.head._buffers["scale"])}
    assert {id(t) for t in parameters_and_buffers(model)} == expected
