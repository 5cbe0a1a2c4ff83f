"""A module's tensors to send, remembered between syncs: every change a trainer can make to a module's
registered tensors shows at the next call, exactly as a fresh walk of its state dict would give it."""

from __future__ import annotations

import gc

import pytest
import torch
from skyrl_backends.weight_sync import module_tensors as memo
from skyrl_backends.weight_sync.module_tensors import module_tensors, without_tied_aliases


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(4, 8, bias=False)


Described = list[tuple[str, int, tuple[int, ...], tuple[int, ...], torch.dtype]]


def fresh_walk(module: torch.nn.Module) -> Described:
    return described(without_tied_aliases(module, module.state_dict()))


def described(pairs: list[tuple[str, torch.Tensor]]) -> Described:
    return [(name, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for name, t in pairs]


def change_data(m: Model) -> None:
    m.blocks[0].proj.weight.data = torch.randn(4, 4)  # same parameter object, new storage


def change_shape(m: Model) -> None:
    m.head.weight.data = torch.randn(3, 4)


# The same bytes seen otherwise: a detached tensor kept from the last call would still point at them.
def view_in_another_shape(m: Model) -> None:
    m.head.weight.data = m.head.weight.data.view(4, 8)


def transpose(m: Model) -> None:
    m.blocks[0].proj.weight.data = m.blocks[0].proj.weight.data.t()


def reinterpret_dtype(m: Model) -> None:
    m.blocks[0].scale.data = m.blocks[0].scale.data.view(torch.int32)  # a buffer: no grad to refuse it


def narrow(m: Model) -> None:
    m.blocks[1].norm.weight.data = m.blocks[1].norm.weight.data[1:]


def replace_parameter(m: Model) -> None:
    m.blocks[1].proj.bias = torch.nn.Parameter(torch.zeros(4))


def delete_parameter(m: Model) -> None:
    del m.blocks[1].proj.bias
    m.blocks[1].proj.register_parameter("bias", None)


def add_buffer(m: Model) -> None:
    m.blocks[0].register_buffer("extra", torch.ones(3))


def make_buffer_non_persistent(m: Model) -> None:
    m.blocks[0]._non_persistent_buffers_set.add("scale")


def replace_submodule(m: Model) -> None:
    m.blocks[0].norm = torch.nn.LayerNorm(4)


def append_submodule(m: Model) -> None:
    m.blocks.append(Block())


def tie_head_to_embedding(m: Model) -> None:
    m.head.weight = m.embed.weight


def add_state_dict_hook(m: Model) -> None:
    def drop_scales(module, state, prefix, local_metadata):
        for name in [n for n in state if n.endswith("scale")]:
            del state[name]
    m.blocks[1]._register_state_dict_hook(drop_scales)


@pytest.mark.parametrize("change", [change_data, change_shape, view_in_another_shape, transpose, reinterpret_dtype,
                                    narrow, replace_parameter, delete_parameter, add_buffer,
                                    make_buffer_non_persistent, replace_submodule, append_submodule,
                                    tie_head_to_embedding, add_state_dict_hook])
def test_a_change_to_the_modules_tensors_shows_at_the_next_call(change):
    model = Model()
    first = module_tensors(model)
    assert described(first) == fresh_walk(model)
    assert module_tensors(model) is not first and described(module_tensors(model)) == described(first)
    assert model in memo._remembered  # the second call used the remembered walk
    change(model)
    assert described(module_tensors(model)) == fresh_walk(model)
    assert described(module_tensors(model)) != described(first)


def test_the_detached_tensors_are_kept_while_they_still_are_their_parameters_data():
    model = Model()
    first = dict(module_tensors(model))
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # training writes in place: nothing to detach again
    again = dict(module_tensors(model))
    assert all(again[name] is first[name] for name in first)
    change_data(model)
    after = dict(module_tensors(model))
    assert after["blocks.0.proj.weight"] is not first["blocks.0.proj.weight"]
    assert after["blocks.0.proj.weight"].data_ptr() == model.blocks[0].proj.weight.data_ptr()


def test_the_tensors_are_detached_views_of_the_parameters_not_copies():
    model = Model()
    pairs = dict(module_tensors(model))
    assert not any(t.requires_grad for t in pairs.values())
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # an optimizer step writes in place
    assert torch.equal(dict(module_tensors(model))["embed.weight"], model.embed.weight)
    assert "blocks.0.cache" not in pairs and "blocks.0.scale" in pairs  # non-persistent buffers stay out


class OwnStateDict(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)

    def state_dict(self, *args, **kwargs):  # not the plain walk: never remembered
        state = super().state_dict(*args, **kwargs)
        state.pop("inner.bias")
        return state


def test_a_module_with_a_state_dict_of_its_own_is_walked_every_time():
    model = OwnStateDict()
    assert [name for name, _ in module_tensors(model)] == ["inner.weight"]
    assert model not in memo._remembered


def test_a_module_with_a_state_dict_hook_is_walked_every_time():
    model = Model()
    module_tensors(model)
    assert model in memo._remembered
    add_state_dict_hook(model)
    assert described(module_tensors(model)) == fresh_walk(model)
    assert model not in memo._remembered  # forgotten: the hook may answer differently next time


def test_the_remembered_walk_goes_with_its_module():
    gc.collect()  # earlier tests' models go first, so that only this one goes below
    model = Model()
    module_tensors(model)
    assert model in memo._remembered
    before = len(memo._remembered)
    del model
    gc.collect()
    assert len(memo._remembered) == before - 1
