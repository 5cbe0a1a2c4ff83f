"""Engine side: an engine's weight load recorded once and replayed as one fused copy.

An engine's ``load_weights`` maps checkpoint names onto its own parameters (``q_proj``, ``k_proj``
and ``v_proj`` into slices of a fused ``qkv_proj``, renamed, sharded) one tensor at a time in Python:
tens of milliseconds for a 1.5B model whose bytes a GPU copies in under two. A colocated trainer
sends the same layout at every step into send buffers that stay where they are (CUDA IPC buffers of
one sender generation, :mod:`skyrl_backends.weight_sync.cuda_ipc`), so the received tensors are the
same views of the same memory every time, and the engine's load makes the same copies every time.

:class:`ReplayedLoad` runs the engine's load once under a dispatch mode that sees every aten
operation, keeps the ``copy_`` calls it made (the destination views into parameters and the source
views into the received tensors), and from then on, while the received tensors and the parameters'
storages are the ones it recorded, queues those copies (a ``chunks.CopyPlan``, split once as
``copy_all`` splits: a copy per large tensor, one fused copy of the small ones; on a GPU captured
once in a CUDA graph and replayed, :func:`copy_options`) instead of running the load. A load is
replayed only if everything it changed it changed by those copies:

* every ``copy_`` reads from a received tensor's memory and writes into a parameter's or buffer's
  storage (a ``copy_`` from anything computed on the way, a dtype conversion or a concatenation,
  would replay stale values);
* no other operation writes anything (an in-place scaling after the copy, a repacked layout), but
  fills with a constant (vLLM's and SGLang's embedding loaders zero their padding rows), which are
  replayed too; a fill with a value read from the received tensors (``.item()``) is refused;
* no two writes touch the same bytes (their order would matter).

Otherwise it says why (:attr:`ReplayedLoad.refused`) and the engine's own load runs every time, as
before. Two things no check here can see: a load whose code branches on the values it loads, and one
that writes parameters outside torch's operators (a kernel launched on raw pointers). The engines'
``load_weights`` of unquantized models do neither; for any other, ``SKYRL_REPLAY_LOADS=0`` in the
engine's environment turns replaying off (:func:`enabled`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from skyrl_backends.weight_sync.chunks import CopyPlan

logger = logging.getLogger(__name__)
ENV = "SKYRL_REPLAY_LOADS"

NamedTensors = Sequence[tuple[str, torch.Tensor]]
_aten = torch.ops.aten
_FILLS = (_aten.fill_.Scalar, _aten.zero_.default)
# What a received tensor must still be for a recorded load to stand for its load: its name, where
# its memory is, and how it is viewed.
_SourceKey = tuple[tuple[str, int, torch.dtype, tuple[int, ...], tuple[int, ...]], ...]


def enabled() -> bool:
    """Whether engines replay their loads (``SKYRL_REPLAY_LOADS``, on unless set to ``0``)."""
    return os.environ.get(ENV, "1") != "0"


GRAPHS_ENV = "SKYRL_REPLAY_GRAPHS"


def copy_options() -> dict[str, Any]:
    """How a replayed load queues its copies on a GPU (``chunks.CopyPlan``'s options): captured once
    in a CUDA graph, the large copies spread over four streams. The copies are the same at every
    update into the same memory, which is what a graph needs, and a copy launched from Python for
    each of thousands of tensors (a MoE model's experts) keeps the GPU waiting. On an H100
    (core/benchmarks/bench_apply_copy.py, docs/benchmarks.md "2026-12-06 (fourth session)") this
    applied the 2,361 tensors of a 6-layer Qwen3-30B-A3B shape in 1.16x the time of one copy of
    their bytes (a copy each from Python: 2.38x; two streams: 1.35x) and a 1.5B model in 1.03x
    (1.26x). ``SKYRL_REPLAY_GRAPHS=0`` in the engine's environment queues them one by one from
    Python instead."""
    return {"streams": 4, "graph": True} if os.environ.get(GRAPHS_ENV, "1") != "0" else {}


def parameters_and_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a model's load may write: the ``owners`` of a :class:`ReplayedLoad` of ``model``, every
    parameter and buffer of every submodule (a shared one maybe more than once).

    Read at every replayed update, so it walks the modules' own dicts, level by level, with C-level
    loops (``map``) over each level's dicts: ``model.parameters()`` builds every parameter's dotted
    name on the way, which the update would spend on names it never reads, and a Python loop per
    module with a generator per dict cost 0.3 ms for a 340-tensor model on a CI CPU."""
    try:
        return _walk(model, dict.values)
    except TypeError:  # a module keeps its registrations in a mapping that is not a dict
        return _walk(model, operator.methodcaller("values"))


def _walk(model: torch.nn.Module, values: Callable[[Any], Iterable[Any]]) -> list[torch.Tensor]:
    modules = [model]
    seen = {id(model)}
    level = [model]
    while level:
        # Each module once: one registered under two names (or inside itself) is seen already.
        level = [m for m in _chain(map(values, map(_MODULES, level)))
                 if m is not None and not (id(m) in seen or seen.add(id(m)))]
        modules += level
    tensors = _chain((_chain(map(values, map(_PARAMETERS, modules))), _chain(map(values, map(_BUFFERS, modules)))))
    return list(filter(_NOT_NONE, tensors))


_chain = itertools.chain.from_iterable
_MODULES = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_BUFFERS = operator.attrgetter("_buffers")
_NOT_NONE = functools.partial(operator.is_not, None)


def _storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _source_key(named: NamedTensors) -> _SourceKey:
    return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) for name, t in named)


def _writes_nothing(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """An in-place operation on an empty tensor (vLLM zeroes an empty padding slice)."""
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].numel() == 0 and "out" not in kwargs


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a view can touch: [first, last + 1)."""
    size = tensor.element_size()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.storage_offset() * size
    return start, start + extent * size


@dataclass
class _Recording:
    sources: _SourceKey
    written: frozenset[int]  # the storages the copies and fills write into, all owned when recorded
    copies: CopyPlan  # the recorded copies: destination views into parameters, source views into received tensors
    fills: list[tuple[torch.Tensor, float | int | bool]]

    def replay(self) -> None:
        with torch.no_grad():
            self.copies.run()
            for destination, value in self.fills:
                destination.fill_(value)


class _CopyRecorder(TorchDispatchMode):
    """Watches one load: keeps its copies from received memory into owned storages, and the first
    reason it cannot be replayed."""

    def __init__(self, sources: Iterable[int], owners: Iterable[int]) -> None:
        super().__init__()
        self.sources = set(sources)
        self.owners = set(owners)
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fills: list[tuple[torch.Tensor, float | int | bool]] = []  # constants, e.g. padding rows
        self.refused: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.refused is None:
            self._watch(func, args, kwargs)
        return func(*args, **kwargs)

    def _watch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if func is _aten.copy_.default:
            self._copy(args[0], args[1])
        elif func in _FILLS:
            destination = args[0]
            if destination.numel() == 0:
                return
            if _storage_ptr(destination) not in self.owners:
                self.refused = f"a fill of {tuple(destination.shape)} writes outside the model's parameters and buffers"
            else:
                self.fills.append((destination, 0 if func is _aten.zero_.default else args[1]))
        elif func is _aten._local_scalar_dense.default and _storage_ptr(args[0]) in self.sources:
            self.refused = "the load reads a received value into Python (.item())"
        else:
            schema = getattr(func, "_schema", None)
            if schema is None:
                self.refused = f"the load runs {func}, whose effects are not declared"
            elif schema.is_mutable and not _writes_nothing(args, kwargs):
                self.refused = f"the load runs {schema.name}, which writes in place"

    def _copy(self, destination: torch.Tensor, origin: Any) -> None:
        if destination.numel() == 0:
            return
        if not isinstance(origin, torch.Tensor) or _storage_ptr(origin) not in self.sources:
            self.refused = f"a copy into {tuple(destination.shape)} reads a value computed during the load"
        elif _storage_ptr(destination) not in self.owners:
            self.refused = f"a copy of {tuple(origin.shape)} writes outside the model's parameters and buffers"
        elif destination.shape != origin.shape:
            self.refused = f"a copy broadcasts {tuple(origin.shape)} into {tuple(destination.shape)}"
        else:
            self.copies.append((destination, origin))

    def overlap(self) -> str | None:
        """Why the copies cannot run in any order: two of them write the same bytes."""
        spans = sorted((_storage_ptr(d), *_byte_span(d)) for d, _ in [*self.copies, *self.fills])
        for (ptr, _, end), (next_ptr, next_start, _) in zip(spans, spans[1:], strict=False):
            if ptr == next_ptr and next_start < end:
                return "two writes of the load touch the same bytes of one parameter"
        return None


class ReplayedLoad:
    """One engine's load, replayed while the received tensors and the parameters stay put.

    ``owners`` returns the model's parameters and buffers (called at every load: a parameter the
    recording writes into that got new storage since makes the load run, and be recorded, again;
    a buffer the load does not write may change as it likes)."""

    def __init__(self, owners: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._owners = owners
        self._recording: _Recording | None = None
        self._refused_sources: _SourceKey | None = None
        self.refused: str | None = None  # why the last recorded load cannot be replayed
        self.replayed = 0  # loads replayed so far
        self.recorded = 0  # loads recorded so far

    def load(self, named: NamedTensors, load: Callable[[NamedTensors], None]) -> bool:
        """Apply ``named``: replay the recorded copies when they stand for ``load(named)``, otherwise
        run ``load(named)`` (recording it). Returns whether it replayed. The tensors of ``named`` must
        live in memory that stays valid as long as they keep their addresses (the caller's promise)."""
        sources = _source_key(named)
        owners = {_storage_ptr(t) for t in self._owners()}
        recording = self._recording
        # Every storage the recording writes into must still be a parameter's or buffer's: one the
        # engine replaced since is kept alive by the recording alone, and writing it would be lost.
        if recording is not None and recording.sources == sources and recording.written <= owners:
            recording.replay()
            self.replayed += 1
            return True
        self._recording = None  # let go of the last layout's buffers before recording another
        if sources == self._refused_sources:
            load(named)
            return False
        recorder = _CopyRecorder((_storage_ptr(t) for _, t in named), owners)
        with recorder:
            load(named)
        self.recorded += 1
        self.refused = recorder.refused or recorder.overlap()
        if self.refused is None and not recorder.copies:
            self.refused = "the load made no copies"
        if self.refused is not None:
            logger.warning("skyrl: this weight load is not replayed (%s); every update of these %d tensors runs it "
                           "in full", self.refused, len(named))
            self._refused_sources = sources
            return False
        logger.info("skyrl: weight load of %d tensors recorded (%d copies, %d fills); replayed from the next update",
                    len(named), len(recorder.copies), len(recorder.fills))
        self._refused_sources = None
        destinations, origins = (list(side) for side in zip(*recorder.copies, strict=True))
        written = frozenset(_storage_ptr(d) for d, _ in [*recorder.copies, *recorder.fills])
        self._recording = _Recording(sources, written, CopyPlan(destinations, origins, **copy_options()),
                                     recorder.fills)
        return False

    def forget(self) -> None:
        """Drop the recording (and its references to received memory)."""
        self._recording = None
        self._refused_sources = None
