"""Colocated weight sync on GPU: one CUDA IPC handle per packed bucket (zero copy).

The sender packs each bucket into a CUDA buffer it keeps (and reuses while the layout stays the
same) and sends, per bucket, the handle's fields as JSON: raw handle bytes in base64 and integers.
The receiver rebuilds the storage with torch's CUDA IPC machinery from fixed, known classes, never
from anything the request names, so nothing is unpickled. The GPU is identified by its UUID so that
sender and engine may see different ``CUDA_VISIBLE_DEVICES`` orderings.

Handles are shared once per allocation, not once per update: every handle names its sender (a random
id) and the sender's *generation*, which grows whenever the sender allocates new buffers. An engine
opens a (sender, generation)'s handles once and uses the opened buffers for every later update of
that generation; a newer generation makes it let go of the older buffers and open the new ones, and
a request of an older generation than one it has opened is refused, so a reallocated buffer is never
read through a stale handle. A trainer whose parameters live in the send buckets
(:meth:`CudaIpcSender.adopt`) then syncs with no copy on its side at all.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import secrets
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.chunks import (
    DEFAULT_BUCKET_BYTES,
    DtypeFor,
    Packer,
    PackPlan,
    Weights,
    adopt,
    plan,
    unpack,
)
from skyrl_backends.weight_sync.delivery import check_finite
from skyrl_backends.weight_sync.layout_memo import LayoutMemo
from skyrl_backends.weight_sync.manifest import BucketManifest, parse_buckets

STRATEGY = "cuda_ipc"
# Buffers of this process's live senders by their handle's text, for an engine that runs in the
# trainer's own process (SGLang's Engine keeps its tokenizer manager in the caller's process): CUDA
# cannot open a handle in the process that exported it ("invalid device context"), and there is no
# need to, the buffer is right here. Weak: a closed sender's buffers go.
_own_buffers: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
# Opened storages of the last update whose handles name no sender generation, kept so that the next
# update with the same handles rebuilds them from torch's cache instead of opening the handles again
# (cudaIpcOpenMemHandle is slow).
_open_storages: dict[tuple[bytes, int], torch.Tensor] = {}
_SENDER_ID = re.compile(r"^[0-9a-f]{16,64}$")


class OpenedShares:
    """The buffers this process opened from senders' handles, by sender and generation.

    A generation's handle is opened once (``open`` is called once per handle) and its buffer handed
    out for every later update of that generation. A newer generation of the same sender drops the
    older one's buffers first (the sender has let go of them; its memory stays valid until this
    process lets go too, as torch's CUDA IPC reference counting ensures); an older one is refused.
    ``opened`` counts the handles opened so far."""

    def __init__(self) -> None:
        self._by_sender: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self.opened = 0

    def get(self, sender: str, generation: int, key: str, nbytes: int, where: str,
            open: Callable[[], torch.Tensor]) -> torch.Tensor:
        known = self._by_sender.get(sender)
        if known is not None and generation < known[0]:
            raise WeightUpdateError({f"{where}.ipc.generation": (
                f"is {generation}, but this engine has opened generation {known[0]} of that sender: the sender "
                f"reallocated its buffers after this request was made; send a new request")})
        if known is None or generation > known[0]:
            known = self._by_sender[sender] = (generation, {})
        buffer = known[1].get(key)
        if buffer is None:
            buffer = known[1][key] = open()
            self.opened += 1
        if buffer.numel() != nbytes:
            raise WeightUpdateError({f"{where}.nbytes": f"is {nbytes}, but this handle's bucket, opened before, "
                                                        f"holds {buffer.numel()} bytes"})
        return buffer

    def keep_only(self, senders: set[str]) -> None:
        """Let go of the buffers of every sender not in ``senders`` (those of the last update)."""
        for sender in [s for s in self._by_sender if s not in senders]:
            del self._by_sender[sender]

    def generation(self, sender: str) -> int | None:
        known = self._by_sender.get(sender)
        return None if known is None else known[0]


_shares = OpenedShares()


def handles_opened() -> int:
    """How many CUDA IPC handles of generation-naming senders this process has opened (each once)."""
    return _shares.opened


@functools.cache
def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _local_index(uuid: str | None, fallback: torch.device) -> int:
    if uuid:
        for i in range(torch.cuda.device_count()):
            if device_uuid(i) == uuid:
                return i
    if fallback.type == "cuda":
        return fallback.index if fallback.index is not None else torch.cuda.current_device()
    raise WeightUpdateError({"payload.device_uuid": f"GPU {uuid!r} is not visible to this engine; CUDA IPC "
                                                    f"needs the trainer and the engine on the same GPU node"})


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def encode_handle(buffer: torch.Tensor) -> dict[str, Any]:
    """JSON-able fields of a CUDA IPC handle of the uint8 tensor ``buffer``."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    (_cls, size, stride, offset, _storage_cls, _dtype, device, handle, storage_nbytes, storage_offset,
     _grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return {"pid": os.getpid(), "device_uuid": device_uuid(device), "handle": _b64(handle),
            "storage_nbytes": int(storage_nbytes),
            "storage_offset": int(storage_offset), "tensor_offset": int(offset), "ref_counter_handle": _b64(ref_handle),
            "ref_counter_offset": int(ref_offset), "event_handle": _b64(event_handle),
            "event_sync_required": bool(event_sync)}


def _decode_bytes(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise WeightUpdateError({field: f"expected base64 text, got {type(value).__name__}"})
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise WeightUpdateError({field: "is not valid base64"}) from None


def _int_field(ipc: dict[str, Any], key: str, where: str) -> int:
    value = ipc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WeightUpdateError({f"{where}.{key}": f"expected a non-negative integer, got {value!r}"})
    return value


def from_this_process(request: WeightUpdateRequest) -> bool:
    """Whether the request's buffers belong to a sender in this very process: then the received
    tensors are views of memory this process owns, which an engine may share onwards as they are."""
    buckets = request.payload.get("buckets") if isinstance(request.payload, dict) else None
    ipcs = [b.get("ipc") for b in buckets or [] if isinstance(b, dict) and b.get("ipc")]
    return bool(ipcs) and all(_is_own(i) for i in ipcs)


def keeps_buffers(request: WeightUpdateRequest) -> bool:
    """Whether every bucket of the CUDA IPC request lives in a buffer its sender keeps for a whole
    generation: the received tensors are then the same memory at every update of that generation
    (what :class:`skyrl_backends.weight_sync.replay.ReplayedLoad` needs)."""
    if request.strategy != STRATEGY or not isinstance(request.payload, dict):
        return False
    buckets = [b for b in request.payload.get("buckets") or [] if not (isinstance(b, dict) and b.get("nbytes") == 0)]
    return bool(buckets) and all(isinstance(b, dict) and isinstance(b.get("ipc"), dict)
                                 and {"sender", "generation"} <= b["ipc"].keys() for b in buckets)


def own_buckets(request: WeightUpdateRequest, device: torch.device | str) -> list[tuple[BucketManifest, torch.Tensor]]:
    """The buckets of a request from a sender in this process (:func:`from_this_process`), validated
    as :func:`receive` validates them, with the sender's own buffers: for an engine that hands whole
    buckets onwards instead of a view per tensor (values checked too when the request asks)."""
    buckets = [(manifest, open_handle(raw["ipc"], manifest.nbytes, torch.device(device), f"payload.buckets[{b}]"))
               for b, (manifest, raw) in enumerate(parse_buckets(request, extra_fields=("ipc",))) if manifest.nbytes]
    if request.check_finite:
        check_finite([pair for manifest, buffer in buckets for pair in unpack(manifest, buffer)])
    return buckets


def _is_own(ipc: Any) -> bool:
    """Whether the handle fields come from a sender in this very process."""
    return isinstance(ipc, dict) and ipc.get("pid") == os.getpid()


def _own_key(ipc: dict[str, Any]) -> str:
    return (f"{ipc.get('handle')}:{ipc.get('storage_offset')}:{ipc.get('tensor_offset')}:{ipc.get('sender')}:"
            f"{ipc.get('generation')}")


def _persistent(ipc: dict[str, Any], where: str) -> tuple[str, int] | None:
    """The (sender, generation) a handle names, checked; None for a handle that names none."""
    if "sender" not in ipc and "generation" not in ipc:
        return None
    sender = ipc.get("sender")
    if not isinstance(sender, str) or not _SENDER_ID.match(sender):
        raise WeightUpdateError({f"{where}.ipc.sender": f"expected 16-64 lowercase hex digits, got {sender!r}"})
    return sender, _int_field(ipc, "generation", f"{where}.ipc")


def open_handle(ipc: Any, nbytes: int, device: torch.device, where: str) -> torch.Tensor:
    """The sender's buffer (``nbytes`` uint8) from the JSON fields of its handle."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not isinstance(ipc, dict):
        raise WeightUpdateError({f"{where}.ipc": f"expected an object, got {type(ipc).__name__}"})
    handle = _decode_bytes(ipc.get("handle"), f"{where}.ipc.handle")
    ref_handle = _decode_bytes(ipc.get("ref_counter_handle"), f"{where}.ipc.ref_counter_handle")
    event = ipc.get("event_handle")
    event_handle = None if event is None else _decode_bytes(event, f"{where}.ipc.event_handle")
    storage_nbytes = _int_field(ipc, "storage_nbytes", f"{where}.ipc")
    storage_offset = _int_field(ipc, "storage_offset", f"{where}.ipc")
    tensor_offset = _int_field(ipc, "tensor_offset", f"{where}.ipc")
    ref_offset = _int_field(ipc, "ref_counter_offset", f"{where}.ipc")
    if tensor_offset + nbytes > storage_nbytes:
        raise WeightUpdateError({f"{where}.ipc": f"the shared storage holds {storage_nbytes} bytes but the bucket "
                                                 f"needs [{tensor_offset}, {tensor_offset + nbytes})"})
    persistent = _persistent(ipc, where)
    if _is_own(ipc):
        own = _own_buffers.get(_own_key(ipc))
        if own is None or own.numel() != nbytes:
            raise WeightUpdateError({f"{where}.ipc": "names a buffer of this process that no live CudaIpcSender "
                                                     "holds (closed, or written again since)"})
        return own
    index = _local_index(ipc.get("device_uuid"), device)

    def rebuild() -> torch.Tensor:
        try:
            with torch.cuda.device(index):
                return rebuild_cuda_tensor(
                    torch.Tensor, torch.Size([nbytes]), (1,), tensor_offset, torch.UntypedStorage, torch.uint8, index,
                    handle, storage_nbytes, storage_offset, False, ref_handle, ref_offset, event_handle,
                    bool(ipc.get("event_sync_required", True)))
        except RuntimeError as exc:
            raise WeightUpdateError({f"{where}.ipc": f"could not open the CUDA IPC handle: {exc}"}) from None

    if persistent is None:
        return rebuild()
    sender, generation = persistent
    key = f"{ipc['handle']}:{storage_offset}:{tensor_offset}:{storage_nbytes}:{index}"
    return _shares.get(sender, generation, key, nbytes, where, rebuild)


class CudaIpcSender:
    """Packs buckets into CUDA buffers it owns and describes them by IPC handle.

    Keep one sender across steps: buffers (and so handles) are reused while the layout is the same,
    and each is shared once (engines open it once). The caller must not :meth:`write` again before
    the engines applied the previous update."""

    strategy = STRATEGY

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.id = secrets.token_hex(8)  # names this sender's handles; with the generation, the engines' cache key
        self.generation = 0  # grows with every allocation of new buffers
        self._buffers: list[torch.Tensor] = []
        self._handles: list[dict[str, Any]] | None = None  # the current buffers' shares, made once
        self._packer = Packer()

    def write(self, layout: PackPlan) -> dict[str, Any]:
        buckets = self._packer.pack(self.allocate(layout), layout)
        return self.share(layout, buckets)

    @property
    def copied(self) -> int:
        """How many tensors the last :meth:`write` copied (0 for a model that lives in the buckets)."""
        return self._packer.copied

    def adopt(self, weights: Weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
              dtype_for: DtypeFor = None) -> dict[str, torch.Tensor]:
        """Move ``weights`` into this sender's send buckets, where they stay: a module's parameters and
        buffers become views of the buckets (``.data``), so training updates them in place and every
        later sync of the same layout copies nothing on the trainer's side. Returns each name's view
        (for a mapping or pairs, train those). ``bucket_bytes`` and ``dtype_for`` must be those of the
        syncs to come, and ``dtype_for`` must keep every tensor's dtype (nothing is converted in
        place); see :func:`skyrl_backends.weight_sync.chunks.adopt`.

        The trainer's writes (optimizer steps) must be done on this device's current stream, or
        synchronized with it, before the next sync: the sender waits for that stream only."""
        layout = plan(weights, bucket_bytes, dtype_for)
        return adopt(weights, self.allocate(layout), layout, self._packer)

    def allocate(self, layout: PackPlan) -> list[torch.Tensor]:
        """One buffer per bucket of ``layout`` (kept from the last update when the sizes match)."""
        sizes = [b.nbytes for b in layout.buckets]
        if [b.numel() for b in self._buffers] != sizes:
            self._buffers = [torch.empty(max(n, 1), dtype=torch.uint8, device=self.device)[:n] for n in sizes]
            self.generation += 1
            self._handles = None
        return self._buffers

    def share(self, layout: PackPlan, buckets: list[dict[str, Any]]) -> dict[str, Any]:
        """The payload for the allocated buffers, once written (``buckets``: each bucket's JSON, as
        the packer returns it)."""
        # The engine reads on its own stream: every copy must be finished before the handles are used.
        torch.cuda.current_stream(self.device).synchronize()
        if self._handles is None:
            # Shared once per generation: each share takes a reference count that an engine releases
            # when it lets go of the opened buffer, which it keeps for the whole generation.
            self._handles = [{**encode_handle(b), "sender": self.id, "generation": self.generation} if b.numel()
                             else {} for b in self._buffers]
            for handle, buffer in zip(self._handles, self._buffers, strict=True):
                if handle:
                    _own_buffers[_own_key(handle)] = buffer
        return layout.payload([{"ipc": h, **m} for h, m in zip(self._handles, buckets, strict=True)])

    def close(self) -> None:
        self._buffers = []
        self._handles = None
        self._packer = Packer()


# The last update's layout and views: a request with the same layout reuses them once its handles
# are opened (and checked) again and found to be the same buffers.
_memo = LayoutMemo(volatile=("ipc",))


def receive(request: WeightUpdateRequest, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Open every bucket's handle (validating fields and sizes) before yielding views into them."""
    device = torch.device(device)
    if _memo.matches(request):
        raw_buckets = request.payload["buckets"]
        buffers = [open_handle(raw.get("ipc"), raw["nbytes"], device, f"payload.buckets[{b}]")
                   if raw["nbytes"] else None for b, raw in enumerate(raw_buckets)]
        pairs = _memo.views(buffers)
        if pairs is not None:
            _keep_open(raw_buckets, buffers)
            return iter(pairs)
    staged = []
    parsed = parse_buckets(request, extra_fields=("ipc",))
    for b, (manifest, raw) in enumerate(parsed):
        if manifest.nbytes == 0:
            staged.append((manifest, torch.empty(0, dtype=torch.uint8, device=device)))
            continue
        staged.append((manifest, open_handle(raw["ipc"], manifest.nbytes, device, f"payload.buckets[{b}]")))
    buffers = [buffer if manifest.nbytes else None for manifest, buffer in staged]
    raw_buckets = [raw for _, raw in parsed]
    _keep_open(raw_buckets, buffers)
    pairs = [pair for manifest, buffer in staged for pair in unpack(manifest, buffer)]
    if any(_is_own(raw["ipc"]) for raw in raw_buckets):
        _memo.forget()  # views of a sender's own buffers must not keep them alive after it closes
    else:
        _memo.remember(request, buffers, pairs)
    return iter(pairs)


def _keep_open(raw_buckets: list[Any], buffers: list[torch.Tensor | None]) -> None:
    """Keep this update's opened storages (and only those) for the next update to find."""
    keep: dict[tuple[bytes, int], torch.Tensor] = {}
    senders = {raw["ipc"].get("sender") for raw in raw_buckets if isinstance(raw.get("ipc"), dict)}
    _shares.keep_only({s for s in senders if isinstance(s, str)})
    for raw, buffer in zip(raw_buckets, buffers, strict=True):
        if buffer is not None and "sender" in raw["ipc"]:
            continue  # kept by _shares, for its generation
        if buffer is not None and not _is_own(raw["ipc"]):  # a sender's own buffers are not ours
            # Buckets may share one CUDA allocation (one handle) at different offsets.
            keep[(_decode_bytes(raw["ipc"]["handle"], "handle"), raw["ipc"]["storage_offset"])] = buffer
    _open_storages.clear()
    _open_storages.update(keep)
