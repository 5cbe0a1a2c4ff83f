"""The one call a trainer makes: push a model's weights into one or many engines.

::

    sender = make_sender("shared_memory")  # kept across steps: buffers and engine-side state reused
    versions = await sync_weights(engines, model, strategy="shared_memory", sender=sender)

``engines`` is one engine or a list of them: anything implementing
:class:`skyrl_backends.protocols.Engine` (an :class:`~skyrl_backends.InferenceEngine`, a Ray proxy,
a client over several engines). The whole model
travels as ONE :class:`~skyrl_backends.types.WeightUpdateRequest`, so each engine validates all of
it before applying anything and bumps its weight version once. Tensors are converted to the dtype
each engine holds (read from its ``weight_specs``) unless ``dtype_for`` says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from skyrl_backends import capabilities as caps
from skyrl_backends.capabilities import receives_packed_broadcast
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.protocols import Engine
from skyrl_backends.weight_sync import broadcast, sharded, shared_memory
from skyrl_backends.weight_sync.chunks import (
    DEFAULT_BUCKET_BYTES,
    DtypeFor,
    PackPlan,
    Weights,
    named_columns,
    plan_named,
)
from skyrl_backends.weight_sync.engines import (
    BASE_WEIGHTS,
    ENGINE_DTYPES,
    Delivery,
    Targets,
    apply_all,
    as_list,
    engine_dtypes,
    pool_of,
    validate_all,
    versions_of,
)
from skyrl_backends.weight_sync.ranks import DEFAULT_TIMEOUT_S as DEFAULT_RANKS_TIMEOUT_S
from skyrl_backends.weight_sync.senders import KEPT_SENDER_STRATEGIES, sender_for

logger = logging.getLogger(__name__)
# Syncs so far that made their own sender (and closed it after): the second one is warned about.
_syncs_without_a_kept_sender = 0


def _note_sender_made_per_sync(strategy: str) -> None:
    """Warn once per process when a trainer syncs a second time without a kept sender: every such
    sync allocates and fills new buffers, and the engines open them and validate (CUDA IPC: also
    record their load) anew, instead of reusing what the last update left."""
    global _syncs_without_a_kept_sender
    _syncs_without_a_kept_sender += 1
    if _syncs_without_a_kept_sender == 2:
        logger.warning("sync_weights made a new %r sender for this sync, as for an earlier one: keep one across "
                       "syncs (sender = make_sender(%r); sync_weights(..., sender=sender)), so that its buffers "
                       "and the engines' opened handles and validated layout are reused (docs/weight-sync.md)",
                       strategy, strategy)


def _num_ranks(target: Engine) -> int:
    pool = pool_of(target)
    if pool is not None:
        return sum(_num_ranks(e) for e in pool)
    sizes = getattr(target, "parallel_sizes", None)
    if callable(sizes):
        result = sizes()
        if hasattr(result, "tensor"):
            return int(result.tensor) * int(result.pipeline)
    return 1


async def connect_broadcast(targets: Targets, *, master_addr: str = "127.0.0.1", master_port: int = 0,
                            backend: str | None = None, group_name: str = "skyrl_weight_sync",
                            device: torch.device | str | None = None, ranks_per_engine: Sequence[int] | None = None,
                            timeout_s: float = broadcast.DEFAULT_TIMEOUT_S,
                            layout: str | None = None, apply: str = "atomic") -> broadcast.BroadcastSender:
    """Create the trainer's group (rank 0) and have every engine join it through its
    ``init_weight_update_communicator`` hook. ``backend`` defaults to nccl when ``device`` is CUDA,
    gloo otherwise; ``master_port=0`` picks a free port. ``layout`` defaults to ``"packed"`` on NCCL
    and ``"per_tensor"`` on gloo, where packing costs a copy as slow as the transfer itself
    (docs/benchmarks.md), and to ``"per_tensor"`` whenever an engine declares it receives no packed
    broadcast (``Capabilities.broadcast_layouts``: SGLang's native receiver, for one).

    ``apply``: ``"atomic"`` (each engine stages the whole update before loading any of it, so a
    transfer that fails midway changes nothing) or ``"streamed"`` (``packed`` only: each engine loads
    a bucket while the next arrives; engine memory stays at two buckets and the last copy overlaps
    nothing but one bucket, but a failed transfer leaves the engine refusing to generate until a
    complete update arrives)."""
    engines = as_list(targets)
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    members = [m for e in engines for m in (pool_of(e) or [e])]
    # Every engine must be able to join before any starts to: an engine that joins waits for the
    # whole group, and would stay stuck in a group that never forms, refusing the trainer's next one.
    for member in members:
        if member.capabilities is not None:
            caps.require(member.capabilities, caps.weight_sync(broadcast.STRATEGY), member.backend,
                         "connect_broadcast checks every engine before any joins the group")
    native = sorted({m.backend for m in members if not receives_packed_broadcast(m.capabilities)})
    if layout is None:  # streamed updates are applied bucket by bucket, so they travel packed
        layout = "packed" if apply == "streamed" or not (native or backend == "gloo") else "per_tensor"
    if apply == "streamed" and native:
        raise WeightUpdateError({"apply": f"'streamed' needs skyrl's packed receiver, but {native} engines "
                                          f"receive broadcasts natively, per tensor; use apply='atomic'"})
    ranks = list(ranks_per_engine) if ranks_per_engine is not None else [_num_ranks(e) for e in engines]
    if len(ranks) != len(engines):
        raise WeightUpdateError({"ranks_per_engine": f"has {len(ranks)} entries for {len(engines)} engines"})
    sender = broadcast.BroadcastSender(1 + sum(ranks), master_addr, master_port, backend, group_name, device,
                                       timeout_s, layout, apply)
    offsets = [1 + sum(ranks[:i]) for i in range(len(engines))]
    joins = []
    for engine, offset in zip(engines, offsets, strict=False):
        pool = pool_of(engine)
        if pool is None:
            joins.append(engine.init_weight_update_communicator(sender.init_info(offset)))
        else:  # a client: one init info per engine of its pool, consecutive ranks
            infos, next_offset = [], offset
            for member in pool:
                infos.append(sender.init_info(next_offset))
                next_offset += _num_ranks(member)
            joins.append(engine.init_weight_update_communicator(infos))
    # One engine failing to join abandons the group, releasing the others (and this rank) at once.
    await sender.join_with(joins)
    return sender


async def sync_weights(targets: Targets | None, weights: Weights, strategy: str = shared_memory.STRATEGY, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype_for: DtypeFor | str = ENGINE_DTYPES,
                       sender: Any = None, check_finite: bool = False, group: Any = None,
                       timeout_s: float = DEFAULT_RANKS_TIMEOUT_S) -> list[int]:
    """Push ``weights`` (a module, a state dict or ``(name, tensor)`` pairs) into every engine of
    ``targets`` and return the weight version each engine serves afterwards, in order.

    ``strategy``: ``"shared_memory"`` (same machine, CPU buffers), ``"cuda_ipc"`` (same GPU node),
    ``"broadcast"`` (anywhere; pass ``sender=await connect_broadcast(engines)``) or ``"tensors"``
    (engines in this process). ``bucket_bytes`` bounds each packed buffer. A sender passed in is
    reused and left open; one made here is closed before returning.

    ``check_finite=True`` has every engine check the values it receives before applying any:
    an update holding a NaN or an infinity is refused with a WeightUpdateError naming the tensors,
    and no engine changes (a ``streamed`` broadcast excepted, whose engines then refuse to generate
    until every weight arrives again). It costs each engine one pass over the bytes
    (docs/benchmarks.md).

    A model sharded across trainer ranks (DTensor parameters, as FSDP2's ``fully_shard`` makes them)
    is synced collectively: every rank of ``group`` (default: the default process group) calls this
    with the same strategy, bucket size and model; rank 0 of the group passes the engines (and the
    broadcast sender), the others may pass None. Every rank returns the same versions or raises the
    same error; ranks that call differently fail at once, and a rank that does not call makes the
    others fail after ``timeout_s`` (:mod:`skyrl_backends.weight_sync.sharded`)."""
    names, tensors = named_columns(weights)  # checked once: the plan below takes them as they are
    if group is not None or sharded.is_sharded(tensors):
        return await sharded.sync_sharded(targets, list(zip(names, tensors, strict=True)), strategy,
                                          bucket_bytes=bucket_bytes, dtype_for=dtype_for, sender=sender, group=group,
                                          timeout_s=timeout_s, check_finite=check_finite)
    engines = as_list(targets) if targets is not None else []
    if not engines:
        raise WeightUpdateError({"targets": "no engine given"})
    if sender is None and strategy in KEPT_SENDER_STRATEGIES:
        _note_sender_made_per_sync(strategy)
    if dtype_for == ENGINE_DTYPES:
        dtype_for = await engine_dtypes(engines)
    layout = plan_named(names, tensors, bucket_bytes, dtype_for)
    return versions_of(engines, await deliver(engines, layout, strategy, sender, BASE_WEIGHTS,
                                              check_finite=check_finite))


async def deliver(engines: list[Engine], layout: PackPlan, strategy: str, sender: Any,
                  delivery: Delivery = BASE_WEIGHTS, *, check_finite: bool = False) -> list[Any]:
    """Move ``layout`` by ``strategy`` as one request that every engine validates, then applies;
    returns each engine's result. A sender passed in is reused and left open; one made here is
    closed before returning."""
    if strategy == "tensors":
        tensors = [layout.tensors[n].to(getattr(torch, d)) for n, d in zip(layout.names, layout.dtypes, strict=False)]
        request = layout.request("tensors", tensors, check_finite)
        return await apply_all(engines, request, delivery)
    if strategy == broadcast.STRATEGY:
        if not isinstance(sender, broadcast.BroadcastSender):
            raise WeightUpdateError(
                {"sender": "broadcast needs the group: pass sender=await connect_broadcast(engines)"})
        return await _broadcast(engines, layout, sender, delivery, check_finite)
    own_sender = sender is None
    sender = sender_for(strategy, sender)
    try:
        request = layout.request(strategy, sender.write(layout), check_finite)
        return await apply_all(engines, request, delivery)
    finally:
        if own_sender:
            sender.close()


async def _broadcast(engines: list[Engine], layout: PackPlan, sender: broadcast.BroadcastSender,
                     delivery: Delivery, check_finite: bool) -> list[Any]:
    request = layout.request(broadcast.STRATEGY, sender.payload(layout), check_finite)
    # Every engine must take part in every broadcast: check them all before the first byte moves,
    # since an engine that refuses would leave the others waiting until the group's timeout.
    await validate_all(engines, request, delivery)
    results = await asyncio.gather(asyncio.to_thread(sender.send, layout),
                                   *(delivery.apply(e, request) for e in engines))
    return list(results[1:])
