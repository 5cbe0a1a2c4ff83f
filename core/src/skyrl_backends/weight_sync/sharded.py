"""Weight sync from a trainer whose model is sharded across its ranks (FSDP2's ``fully_shard``, whose
parameters are DTensors), with bounded memory.

The sync is collective: every rank of the trainer's group calls ``sync_weights`` with the same
strategy, bucket size and (sharded) model. Rank 0 of the group, the *sending rank*, holds the engines
and the sender: it plans the update with the tensors' global shapes, as for an unsharded model, has
every engine validate it before a byte moves, and makes the one request each engine applies
atomically. The other ranks contribute their shards; every rank returns the engines' versions, or
raises the same error (:mod:`skyrl_backends.weight_sync.ranks` says how the ranks agree).

The full model is never gathered on a rank: the update travels in the strategy's buckets, and each
bucket is assembled from the ranks' shards of its tensors when its turn comes. Per tensor:

``rows``
    a DTensor sharded on dim 0 over a one-dimensional mesh (FSDP2's layout). Each rank's shard is a
    block of consecutive rows, so consecutive bytes of the tensor in the bucket; each rank's block is
    copied into its place, converted to the engine's dtype on the way.
``whole``
    a plain tensor (a buffer every rank holds) or a replicated DTensor: the sending rank's copy.
``full``
    any other layout (another sharded dim, a 2-D mesh, a partial placement): ``full_tensor()`` on
    every rank of its mesh, written by the sending rank; one tensor at a time.

Where the ranks write their rows:

*directly*, when the bucket buffers are shared memory and every rank runs on the sending rank's
machine: into the shared-memory segments of the ``shared_memory`` strategy, or into the two
bucket buffers of the CPU broadcast, which then live in shared memory. Nothing is gathered: every
rank copies its own shard, in parallel;

*gathered*, otherwise (CUDA IPC, NCCL, ranks on several machines): bucket by bucket, each rank sends
its rows of the bucket to the sending rank, one message per rank and bucket over the trainer's group,
and the sending rank copies them into place. The sending rank holds at most one bucket of received
rows besides the strategy's own buffers.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync import broadcast, cuda_ipc, shared_memory
from skyrl_backends.weight_sync.chunks import PackPlan, copy_all, plan, view
from skyrl_backends.weight_sync.engines import (
    ENGINE_DTYPES,
    apply_all,
    as_list,
    engine_dtypes,
    validate_all,
    versions_of,
)
from skyrl_backends.weight_sync.manifest import DTYPE_ITEMSIZE, BucketManifest, TensorEntry, plan_buckets
from skyrl_backends.weight_sync.ranks import TrainerRanks, error_value, raise_posted_error
from skyrl_backends.weight_sync.senders import sender_for

STRATEGIES: tuple[str, ...] = (shared_memory.STRATEGY, cuda_ipc.STRATEGY, broadcast.STRATEGY)
ROWS, WHOLE, FULL = "rows", "whole", "full"


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any tensor is a DTensor (a model sharded across ranks); a C-level loop, as a sync asks
    at every step."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(map(isinstance, tensors, itertools.repeat(dtensor)))


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


# -- what each rank holds -----------------------------------------------------------------------------
@dataclass
class _Tensor:
    """One tensor of the model as this rank holds it."""

    name: str
    tensor: torch.Tensor  # the DTensor, or the plain tensor
    kind: str
    mesh_ranks: list[int] = field(default_factory=list)  # global ranks of its mesh, by coordinate (rows)
    local: torch.Tensor | None = None  # this rank's shard (rows) or its copy (whole)

    def rows_of(self, global_rank: int) -> tuple[int, int]:
        """``(start, count)``: the rows the rank holds (torch.chunk's split: ceil(n / parts) rows each)."""
        if global_rank not in self.mesh_ranks:
            return 0, 0
        n = self.tensor.shape[0]
        per = -(-n // len(self.mesh_ranks))
        start = min(self.mesh_ranks.index(global_rank) * per, n)
        return start, min(n, start + per) - start


class ShardedModel:
    """The model's tensors on this rank, each classified (the same way on every rank: from global
    metadata only, then corrected by what every rank reported at the handshake)."""

    def __init__(self, pairs: Sequence[tuple[str, torch.Tensor]], ranks: TrainerRanks) -> None:
        self.ranks = ranks
        self.me = ranks.global_ranks[ranks.rank]
        self.tensors: dict[str, _Tensor] = {}
        problems = {}
        for name, tensor in pairs:
            entry, problem = self._classify(name, tensor)
            self.tensors[name] = entry
            if problem:
                problems[name] = problem
        if problems:  # decided from global metadata: every rank raises the same error
            raise WeightUpdateError(problems)

    def _classify(self, name: str, tensor: torch.Tensor) -> tuple[_Tensor, str | None]:
        dtensor = _dtensor_class()
        if dtensor is None or not isinstance(tensor, dtensor):
            return _Tensor(name, tensor, WHOLE, local=tensor), None
        mesh, placements = tensor.device_mesh, tensor.placements
        mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if self.ranks.sender_global_rank not in mesh_ranks or not set(mesh_ranks) <= set(self.ranks.global_ranks):
            return _Tensor(name, tensor, FULL), (
                f"is sharded over ranks {mesh_ranks}, which must include the sending rank "
                f"{self.ranks.sender_global_rank} and lie within the trainer's group {self.ranks.global_ranks}; "
                f"pass group= the group of the ranks that shard the model")
        local = tensor.to_local()
        if all(p.is_replicate() for p in placements):
            return _Tensor(name, tensor, WHOLE, mesh_ranks, local), None
        if mesh.ndim == 1 and _is_row_shard(placements[0], tensor.ndim):
            return _Tensor(name, tensor, ROWS, mesh_ranks, local), None
        return _Tensor(name, tensor, FULL, mesh_ranks), None

    def description(self) -> list[str]:
        """What every rank must agree on: each tensor's name, global shape and dtype, in order."""
        return [f"{t.name}:{list(t.tensor.shape)}:{str(t.tensor.dtype).removeprefix('torch.')}"
                for t in self.tensors.values()]

    def local_facts(self) -> dict[str, Any]:
        """Facts about this rank that the others need: where it runs (can it map the sending rank's
        shared memory?) and which row shards do not hold the rows torch.chunk would give them."""
        off_rule = []
        for t in self.tensors.values():
            if t.kind == ROWS:
                start, count = t.rows_of(self.me)
                if t.local is None or tuple(t.local.shape) != (count, *t.tensor.shape[1:]):
                    off_rule.append(t.name)
        return {"host": _host_key(), "off_rule": off_rule}

    def settle(self, calls: list[dict[str, Any]]) -> bool:
        """Combine the ranks' facts; returns whether every rank can write into the sending rank's
        shared memory. A row shard that any rank holds differently is gathered whole instead."""
        for call in calls:
            for name in call["local"]["off_rule"]:
                self.tensors[name].kind = FULL
                self.tensors[name].local = None
        hosts = {tuple(call["local"]["host"]) for call in calls}
        return len(hosts) == 1


def _is_row_shard(placement: Any, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    # Exactly Shard (a strided shard, its subclass, interleaves rows across ranks).
    return type(placement) is Shard and ndim >= 1 and placement.dim % ndim == 0


def _host_key() -> list[Any]:
    """Ranks with the same key see the same POSIX shared memory (same machine, same /dev/shm)."""
    try:
        stat = os.stat("/dev/shm")
        return [socket.gethostname(), stat.st_dev, stat.st_ino]
    except OSError:  # no /dev/shm: shared memory across ranks is not assumed
        return [socket.gethostname(), os.getpid(), 0]


# -- assembling buckets -------------------------------------------------------------------------------
def _row_bytes(entry: TensorEntry) -> int:
    return math.prod(entry.shape[1:]) * DTYPE_ITEMSIZE[entry.dtype]


class Assembler:
    """Writes the buckets of one update from the ranks' shards. Every rank calls the same methods for
    the same buckets in the same order (the ``full`` tensors' gathers are collectives)."""

    def __init__(self, model: ShardedModel, buckets: list[BucketManifest]) -> None:
        self.model = model
        self.buckets = buckets
        self.ranks = model.ranks
        self.is_sender = model.ranks.is_sender

    def _entries(self, index: int, kind: str) -> list[tuple[TensorEntry, _Tensor]]:
        return [(e, self.model.tensors[e.name]) for e in self.buckets[index].tensors
                if self.model.tensors[e.name].kind == kind]

    def write_own_rows(self, index: int, buffer: torch.Tensor) -> None:
        """Copy this rank's row shards of bucket ``index`` into their places in ``buffer``."""
        destinations, sources = [], []
        for entry, t in self._entries(index, ROWS):
            start, count = t.rows_of(self.model.me)
            if count:
                offset = entry.offset + start * _row_bytes(entry)
                destinations.append(view(buffer, offset, entry.dtype, (count, *entry.shape[1:])))
                sources.append(t.local)
        if destinations:
            copy_all(destinations, sources)

    def write_rest(self, index: int, buffer: torch.Tensor | None) -> None:
        """The ``full`` tensors of bucket ``index`` (collective: every rank of their meshes takes part)
        and, on the sending rank, the ``whole`` ones."""
        for entry, t in self._entries(index, FULL):
            if self.model.me not in t.mesh_ranks:
                continue
            full = t.tensor.full_tensor()
            if self.is_sender and buffer is not None:
                view(buffer, entry.offset, entry.dtype, entry.shape).copy_(full)
            del full
        if self.is_sender and buffer is not None:
            pairs = [(view(buffer, e.offset, e.dtype, e.shape), t.local) for e, t in self._entries(index, WHOLE)]
            if pairs:
                copy_all([d for d, _ in pairs], [s for _, s in pairs])

    # -- gathered: each rank sends its rows of a bucket to the sending rank ----------------------------
    def _rows_of_rank(self, index: int, global_rank: int) -> list[tuple[TensorEntry, int, int]]:
        spans = []
        for entry, t in self._entries(index, ROWS):
            start, count = t.rows_of(global_rank)
            if count:
                spans.append((entry, start, count))
        return spans

    def _comm_device(self) -> torch.device:
        # Shards travel where they live: NCCL for CUDA shards, gloo for CPU ones.
        for t in self.model.tensors.values():
            if t.kind == ROWS and t.local is not None:
                return t.local.device
        return torch.device("cpu")

    def gather(self, index: int, buffer: torch.Tensor | None) -> None:
        """Assemble bucket ``index`` in ``buffer`` on the sending rank (None elsewhere), the rows of
        the other ranks arriving over the trainer's group."""
        device = self._comm_device()
        sender = self.ranks.sender_global_rank
        if not self.is_sender:
            spans = self._rows_of_rank(index, self.model.me)
            if spans:
                size = sum(count * _row_bytes(entry) for entry, _, count in spans)
                message = torch.empty(size, dtype=torch.uint8, device=device)
                self._pack_spans(message, spans, self.model.me)
                dist.send(message, dst=sender, group=self.ranks.group)
            self.write_rest(index, None)
            return
        assert buffer is not None
        incoming = []
        for global_rank in self.ranks.global_ranks[1:]:
            spans = self._rows_of_rank(index, global_rank)
            if spans:
                size = sum(count * _row_bytes(entry) for entry, _, count in spans)
                message = torch.empty(size, dtype=torch.uint8, device=device)
                incoming.append((spans, message, dist.irecv(message, src=global_rank, group=self.ranks.group)))
        self.write_own_rows(index, buffer)  # while the others' rows arrive
        for spans, message, work in incoming:
            work.wait()
            destinations, sources, offset = [], [], 0
            for entry, start, count in spans:
                nbytes = count * _row_bytes(entry)
                shape = (count, *entry.shape[1:])
                destinations.append(view(buffer, entry.offset + start * _row_bytes(entry), entry.dtype, shape))
                sources.append(view(message, offset, entry.dtype, shape))
                offset += nbytes
            copy_all(destinations, sources)
        self.write_rest(index, buffer)

    def _pack_spans(self, message: torch.Tensor, spans: list[tuple[TensorEntry, int, int]], rank: int) -> None:
        destinations, sources, offset = [], [], 0
        for entry, _, count in spans:
            destinations.append(view(message, offset, entry.dtype, (count, *entry.shape[1:])))
            sources.append(self.model.tensors[entry.name].local)
            offset += count * _row_bytes(entry)
        copy_all(destinations, sources)
        if message.device.type == "cuda":
            torch.cuda.current_stream(message.device).synchronize()


def _finish_device_work(model: ShardedModel) -> None:
    for t in model.tensors.values():
        if t.local is not None and t.local.device.type == "cuda":
            torch.cuda.current_stream(t.local.device).synchronize()
            return


# -- the sync --------------------------------------------------------------------------------------
async def sync_sharded(targets: Any, pairs: list[tuple[str, torch.Tensor]], strategy: str, *, bucket_bytes: int,
                       dtype_for: Any, sender: Any, group: Any, timeout_s: float,
                       check_finite: bool = False) -> list[int]:
    """The collective sync of a sharded model (``sync_weights`` calls it on every rank)."""
    ranks = TrainerRanks(group, timeout_s)
    model = ShardedModel(pairs, ranks)
    call = {"strategy": strategy, "bucket_bytes": bucket_bytes, "check_finite": check_finite,
            "model": model.description(), "local": model.local_facts()}
    calls = await asyncio.to_thread(ranks.handshake, call)
    same_machine = model.settle(calls)
    if strategy not in STRATEGIES:  # every rank was asked the same: every rank raises the same
        raise WeightUpdateError({"strategy": (
            f"got {strategy!r}; a model sharded across ranks is sent with one of {list(STRATEGIES)}, which "
            f"assemble it bucket by bucket ('tensors' would need the whole model on one rank)")})
    if ranks.is_sender:
        return await _send(targets, model, strategy, bucket_bytes, dtype_for, sender, same_machine, check_finite)
    return await asyncio.to_thread(_contribute, model, bucket_bytes)


def _plan_message(layout: PackPlan, mode: str, segments: list[str]) -> dict[str, Any]:
    return {"dtypes": layout.dtypes, "mode": mode, "segments": segments}


async def _send(targets: Any, model: ShardedModel, strategy: str, bucket_bytes: int, dtype_for: Any, sender: Any,
                same_machine: bool, check_finite: bool) -> list[int]:
    ranks = model.ranks
    own_sender = False
    published = False
    try:
        engines = as_list(targets) if targets is not None else []
        if not engines:
            raise WeightUpdateError({"targets": "the sending rank (rank 0 of the trainer's group) must pass the "
                                                "engines"})
        if dtype_for == ENGINE_DTYPES:
            dtype_for = await engine_dtypes(engines)
        layout = plan([(t.name, t.tensor) for t in model.tensors.values()], bucket_bytes, dtype_for)
        if strategy == broadcast.STRATEGY:
            if not isinstance(sender, broadcast.BroadcastSender):
                raise WeightUpdateError(
                    {"sender": "broadcast needs the group: pass sender=await connect_broadcast(engines) on the "
                               "sending rank"})
        else:
            own_sender = sender is None
            sender = sender_for(strategy, sender)
        assembler = Assembler(model, layout.buckets)
        if strategy == shared_memory.STRATEGY:
            direct = same_machine
            buffers = sender.allocate(layout)
            request = layout.request(strategy, sender.payload(layout), check_finite)
            await validate_all(engines, request)
            ranks.publish("plan", _plan_message(layout, "segments" if direct else "gather", sender.segment_names))
            published = True
            await asyncio.to_thread(_fill_segments, assembler, buffers, direct)
            versions = versions_of(engines, await apply_all(engines, request))
        elif strategy == cuda_ipc.STRATEGY:
            buffers = sender.allocate(layout)
            buckets = layout.bucket_sizes()
            await validate_all(engines, layout.request(strategy, layout.payload(buckets), check_finite))
            ranks.publish("plan", _plan_message(layout, "gather", []))
            published = True
            await asyncio.to_thread(_gather_all, assembler, buffers, sender.device)
            request = layout.request(strategy, sender.share(layout, buckets), check_finite)
            versions = versions_of(engines, await apply_all(engines, request))
        else:
            direct = same_machine and sender.device.type == "cpu"
            ring = sender.ring(layout, shared=direct)
            request = layout.request(strategy, sender.payload(layout), check_finite)
            # Every engine takes part in every broadcast: all validate before the first byte moves.
            await validate_all(engines, request)
            ranks.publish("plan", _plan_message(layout, "ring" if direct else "gather",
                                                sender.ring_segment_names if direct else []))
            published = True
            fill = _ring_filler(assembler, direct)
            results = await asyncio.gather(asyncio.to_thread(sender.send_assembled, layout, ring, fill),
                                           *(e.update_named_weights(request) for e in engines))
            versions = versions_of(engines, results[1:])
    except BaseException as exc:
        # The other ranks wait for the plan, then for the result: give them this error instead.
        ranks.publish("result" if published else "plan", error_value(exc))
        raise
    finally:
        if own_sender:
            sender.close()
    ranks.publish("result", {"versions": versions})
    return versions


def _fill_segments(assembler: Assembler, buffers: list[torch.Tensor], direct: bool) -> None:
    """Sending rank, shared memory: every bucket written, by every rank (direct) or gathered."""
    ranks = assembler.ranks
    for index, buffer in enumerate(buffers):
        if direct:
            assembler.write_own_rows(index, buffer)
            assembler.write_rest(index, buffer)
        else:
            assembler.gather(index, buffer)
    _finish_device_work(assembler.model)
    if direct:
        _check_written(ranks.wait_for([f"written/{r}" for r in range(1, ranks.size)], "the other ranks' shards"))


def _gather_all(assembler: Assembler, buffers: list[torch.Tensor], device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this thread's current device, for the copies and NCCL
    for index, buffer in enumerate(buffers):
        assembler.gather(index, buffer)
    _finish_device_work(assembler.model)


def _ring_filler(assembler: Assembler, direct: bool) -> Callable[[int, torch.Tensor], None]:
    """Sending rank, broadcast: fills one bucket into its ring slot once the slot is free (the sender
    calls it after the slot's previous broadcast finished)."""
    ranks = assembler.ranks

    def fill(index: int, buffer: torch.Tensor) -> None:
        if not direct:
            assembler.gather(index, buffer)
            _finish_device_work(assembler.model)
            return
        ranks.post(f"go/{index}", True)  # the slot is free: the other ranks may write bucket `index`
        assembler.write_own_rows(index, buffer)
        assembler.write_rest(index, buffer)
        _check_written(ranks.wait_for([f"written/{index}/{r}" for r in range(1, ranks.size)],
                                      f"the other ranks' shards of bucket {index}"))

    return fill


def _check_written(values: list[Any]) -> None:
    problems = {f"rank {rank}": value for rank, value in enumerate(values, start=1) if value is not True}
    if problems:
        raise WeightUpdateError(problems)


# -- the other ranks -----------------------------------------------------------------------------
def _contribute(model: ShardedModel, bucket_bytes: int) -> list[int]:
    """A rank other than the sending rank: write or send its shards of every bucket, then return the
    versions the sending rank reports (or raise its error)."""
    ranks = model.ranks
    message = ranks.receive("plan", "the sending rank's plan")
    raise_posted_error(message)
    names = list(model.tensors)
    specs = [(name, dtype, tuple(model.tensors[name].tensor.shape)) for name, dtype in zip(names, message["dtypes"],
                                                                                       strict=True)]
    assembler = Assembler(model, plan_buckets(specs, bucket_bytes))
    mode = message["mode"]
    if mode == "gather":
        device = assembler._comm_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for index in range(len(assembler.buckets)):
            assembler.gather(index, None)
    elif mode == "segments":
        outcome: Any = True
        try:
            for index, (name, bucket) in enumerate(zip(message["segments"], assembler.buckets, strict=True)):
                buffer = shared_memory.map_segment(name, bucket.nbytes, f"segment of bucket {index}")
                assembler.write_own_rows(index, buffer)
                assembler.write_rest(index, None)
            _finish_device_work(model)
            shared_memory.forget_mappings_except(set(message["segments"]))
        except Exception as exc:  # reported to the sending rank, which fails the sync for every rank
            outcome = f"{type(exc).__name__}: {exc}"
        ranks.post(f"written/{ranks.rank}", outcome)
    else:  # "ring": the sending rank says when each bucket's slot is free
        ring = message["segments"]
        largest = max(bucket.nbytes for bucket in assembler.buckets)
        for index, bucket in enumerate(assembler.buckets):
            ranks.wait_unless_failed(f"go/{index}", f"the sending rank to free the buffer of bucket {index}")
            outcome = True
            try:
                slot = shared_memory.map_segment(ring[index % 2], largest, f"ring buffer {index % 2}")
                buffer = slot[:bucket.nbytes]
                assembler.write_own_rows(index, buffer)
                assembler.write_rest(index, None)
                _finish_device_work(model)
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            ranks.post(f"written/{index}/{ranks.rank}", outcome)
        shared_memory.forget_mappings_except(set(ring))
    result = ranks.receive("result", "the engines' answer from the sending rank")
    raise_posted_error(result)
    return [int(v) for v in result["versions"]]
