"""A module's tensors to send, by name: its state dict without tied aliases, remembered between syncs.

A trainer syncs the same module at every step, and its state dict is rebuilt each time by a walk over
every submodule: 1.5 ms of Python for a 28-layer model on a CI core, more than the copy of its bytes
on a GPU. What the walk returns depends only on each submodule's registered parameters, buffers and
children (by identity), its non-persistent buffer names and its state-dict hooks; :func:`module_tensors`
remembers those beside the result and walks again only when one of them changed. Training changes
none of them (an optimizer writes into the parameters). ``param.data = ...`` keeps the parameter
object but gives it other data: the detached tensors handed out are kept too, and each is handed out
again only while it still is its parameter's data (same storage, offset, shape, strides and dtype),
else all are detached afresh.

Both checks run as C-level loops over flat lists (``map``), not Python loops per module or tensor:
for a 28-layer model they take about a fifth of the walk's time (0.3 against 1.4 ms on a CI core),
and detaching its 338 tensors anew costs more than checking them (docs/benchmarks.md, "2026-12-06
(fifth session)").

Modules whose state dict is not the plain walk (a ``state_dict``, ``_save_to_state_dict`` or
``get_extra_state`` of their own, or a state-dict hook) are walked every time.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

_Module = torch.nn.Module
# Per root module, what its last walk found. Weak keys: the entry goes with the module. The entry
# holds the submodules and the tensors (not the root), so that ids compared below stay unique.
_remembered: weakref.WeakKeyDictionary[_Module, _Walk] = weakref.WeakKeyDictionary()


def module_tensors(module: _Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``module``'s state dict (parameters and persistent buffers), a tensor
    tied under several names once, under its first; detached, not copied."""
    names, tensors = module_columns(module)
    return list(zip(names, tensors, strict=True))


def module_columns(module: _Module) -> tuple[list[str], list[torch.Tensor]]:
    """:func:`module_tensors` as two new lists, the names and the detached tensors (what a plan reads
    column by column, without splitting pairs at every sync)."""
    walk = _remembered.get(module)
    if walk is None or not walk.still_describes(module):
        walk = _Walk(module)
        if walk.memorable:
            _remembered[module] = walk
        else:
            _remembered.pop(module, None)
    return list(walk.names), walk.detached()


class _Walk:
    """One walk of a module: the state dict's live tensors, and the marks of everything it read."""

    def __init__(self, module: _Module) -> None:
        pairs = without_tied_aliases(module, module.state_dict(keep_vars=True))
        self.names = [name for name, _ in pairs]
        self.tensors = [tensor for _, tensor in pairs]
        submodules = list(module.modules())
        self.memorable = all(_plain_state_dict(m) for m in submodules)
        self.submodules = submodules[1:]  # not the root: the entry must not keep its key alive
        self.marks = _marks(submodules)
        self._alive = [v for m in submodules for v in (*m._parameters.values(), *m._buffers.values())]
        self._detached: list[torch.Tensor] = []  # handed out last, in the order of ``tensors``
        self._dtypes: list[torch.dtype] = []  # the tensors' dtypes when they were detached

    def still_describes(self, module: _Module) -> bool:
        return _marks([module, *self.submodules]) == self.marks

    def detached(self) -> list[torch.Tensor]:
        """Each tensor detached: those of the last call while every one still is its live tensor's
        data (``is_set_to``: storage, offset, shape, strides; and the dtype, which ``is_set_to`` does
        not compare), else detached afresh. A new list."""
        dtypes = list(map(_DTYPE, self.tensors))
        if not self._detached or dtypes != self._dtypes or not _all_set_to(self._detached, self.tensors):
            self._detached = [tensor.detach() for tensor in self.tensors]
            self._dtypes = dtypes
        return list(self._detached)


def _all_set_to(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
    try:
        return all(map(torch.Tensor.is_set_to, tensors, others))
    except (NotImplementedError, RuntimeError):  # a tensor kind without the op (meta, some subclasses)
        return False


_DTYPE = operator.attrgetter("dtype")


def _plain_state_dict(module: _Module) -> bool:
    # A state-dict hook may give other tensors at each call (FSDP's, say, by a setting of its own):
    # a module with one is walked every time, as is one whose class writes its state dict itself.
    cls = type(module)
    return (cls.state_dict is _Module.state_dict and cls._save_to_state_dict is _Module._save_to_state_dict
            and cls.get_extra_state is _Module.get_extra_state and not module._state_dict_hooks
            and not module._state_dict_pre_hooks)


_STATE = operator.attrgetter("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                            "_state_dict_hooks", "_state_dict_pre_hooks")


def _marks(modules: list[_Module]) -> list[tuple[Any, ...]]:
    # Everything the walk read, as flat tuples over all modules in order: per kind (parameters,
    # buffers, children), each module's count, then every name, then every object's id; each module's
    # non-persistent buffer names (count, names) and its number of state-dict hooks. Ids, not the
    # objects: comparing tensors with == would compare their values; the walk keeps every object it
    # marked alive, so an id cannot be taken by a newer object. The counts keep module boundaries:
    # a parameter moved to the next module changes them. Built by map and chain (no Python loop per
    # module): this runs at every sync.
    parameters, buffers, children, non_persistent, hooks, pre_hooks = zip(*map(_STATE, modules), strict=True) \
        if modules else ((),) * 6
    marks: list[tuple[Any, ...]] = []
    for dicts in (parameters, buffers, children):
        marks += [tuple(map(len, dicts)), tuple(itertools.chain.from_iterable(dicts)),
                  tuple(map(id, itertools.chain.from_iterable(map(dict.values, dicts))))]
    marks += [tuple(map(len, non_persistent)), tuple(itertools.chain.from_iterable(non_persistent)),
              tuple(map(len, hooks)), tuple(map(len, pre_hooks))]
    return marks


def without_tied_aliases(module: _Module, state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """A module's state dict lists a tied tensor under every name (``lm_head.weight`` beside
    ``model.embed_tokens.weight``); engines that load tied checkpoints hold it once, under the first
    name, and would reject the alias. Send each once.

    Aliases are read from the module's structure (a parameter or buffer registered under several
    names keeps its first), not from storage addresses: the parameters of a model sharded across
    ranks (FSDP2) are shards whose addresses differ from rank to rank, and every rank must drop the
    same names."""
    aliases = (_later_names(module.named_parameters(remove_duplicate=False))
               | _later_names(module.named_buffers(remove_duplicate=False)))
    return [(name, tensor) for name, tensor in state.items() if name not in aliases]


def _later_names(named: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """The names under which a tensor is met again after its first name, in the module's order (the
    order ``remove_duplicate=True`` keeps the first of)."""
    seen: set[int] = set()
    later: set[str] = set()
    for name, tensor in named:  # the tensors stay alive during the walk, so ids are unique
        if id(tensor) in seen:
            later.add(name)
        else:
            seen.add(id(tensor))
    return later
