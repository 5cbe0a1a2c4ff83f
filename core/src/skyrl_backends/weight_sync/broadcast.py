"""Weight sync when the trainer is elsewhere: a torch.distributed group of the trainer and the engines.

Rank 0 is the trainer; engine ranks start at ``rank_offset`` (an engine with several workers, e.g.
tensor-parallel, joins with ``rank_offset + local_rank`` per worker). The group is NCCL on GPU and
gloo on CPU. It is built directly on its own ``TCPStore`` (prefixed with the group name), never as
torch's default process group, because the engine may already own one (vLLM and SGLang do).

The group's store keys are laid out as SGLang's ``init_custom_process_group`` lays them out (behind
its ``init_weights_update_group``; SkyRL and verl copy it): a ``tcp://`` rendezvous store, prefixed
with the group name, then torch's ``_new_process_group_helper`` prefixes ``<group_name>/`` and
``<device>/``. So an engine that joins with that native code meets the trainer in the same group.

Per update the request carries only the manifests (names, dtypes, shapes, offsets); the bytes follow
from rank 0 in one of two layouts, named in the payload:

``packed`` (default)
    one ``broadcast`` per packed bucket (few large collectives);
``per_tensor``
    one ``broadcast`` per tensor, typed, in the order of the request's names: the protocol of
    engines that receive natively (SGLang's ``update_weights_from_distributed``).

and in one of two ways of applying them, chosen by the trainer (``apply`` in the payload):

``atomic`` (default)
    the receiver receives every bucket into staging before the engine loads a tensor, so a transfer
    that fails midway (a timeout, a dead trainer) changes nothing. Costs a staging copy of the whole
    update on the engine's device, and one device copy of it after the last byte arrives.
``streamed`` (``packed`` only)
    the engine loads each bucket while the next one arrives, through a ring of two bucket-sized
    buffers: engine memory is bounded by two buckets, and the last copy is one bucket's. A transfer
    that fails midway leaves some buckets applied; the engine facade then refuses to generate until
    a complete update arrives (:class:`~skyrl_backends.errors.WeightsNotLoadedError`).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync.chunks import Packer, PackPlan, unpack
from skyrl_backends.weight_sync.layout_memo import LayoutMemo
from skyrl_backends.weight_sync.manifest import check_broadcast_modes, parse_buckets
from skyrl_backends.weight_sync.nccl_transport import INIT_INFO_KEY, check_matches_trainer, cumem_setting

STRATEGY = "broadcast"
BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0
# How long an abandoned group's joins are waited for once its store is down (they fail within a
# second or so; an engine call that hangs regardless is let go).
ABANDON_GRACE_S = 30.0
# How often an abandoned group's marker store is put up again while joins are still running.
MARKER_RENEWAL_S = 2.0
# What the engine does with one bucket's (name, tensor) pairs; the tensors are views into a ring
# buffer that the next-but-one bucket overwrites, so the engine copies them before it returns.
LoadBucket = Callable[[list[tuple[str, torch.Tensor]]], None]


def _check_init_info(info: WeightSyncInitInfo) -> None:
    problems = {}
    if info.backend not in BACKENDS:
        problems["backend"] = f"got {info.backend!r}; expected one of {list(BACKENDS)} (nccl on GPU, gloo on CPU)"
    if not isinstance(info.world_size, int) or info.world_size < 2:
        problems["world_size"] = f"got {info.world_size!r}; the trainer and at least one engine rank make 2"
    if not isinstance(info.rank_offset, int) or not 1 <= info.rank_offset < max(info.world_size, 2):
        problems["rank_offset"] = f"got {info.rank_offset!r}; engine ranks are 1..world_size-1 (rank 0 is the trainer)"
    if not isinstance(info.master_port, int) or not 0 < info.master_port < 65536:
        problems["master_port"] = f"got {info.master_port!r}; give the port the trainer's store listens on"
    if problems:
        raise WeightUpdateError(problems)


def new_group(store: dist.Store, rank: int, world_size: int, backend: str, group_name: str, host: str,
              timeout_s: float) -> Any:
    """A process group of ``world_size`` ranks over ``store`` (blocks until every rank joins), with
    its keys where engines joining natively (SGLang) look for them."""
    timeout = datetime.timedelta(seconds=timeout_s)
    device = "cpu" if backend == "gloo" else "cuda"
    prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        options._timeout = timeout
        return dist.ProcessGroupGloo(prefixed, rank, world_size, options)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise WeightUpdateError({"backend": f"got {backend!r}; expected one of {list(BACKENDS)}"})


def _abandoned_key(group_name: str) -> str:
    """The store key saying the trainer gave up on the group (:meth:`BroadcastSender.abandon`)."""
    return f"skyrl_abandoned/{group_name}"


def _local_host(master_addr: str) -> str:
    # gloo binds to the address that reaches the master; on one machine that is the loopback.
    return "127.0.0.1" if master_addr in ("127.0.0.1", "localhost", "::1") else ""


class BroadcastReceiver:
    """Engine side: one rank of the trainer's group (created by ``make_receiver``)."""

    def __init__(self, info: WeightSyncInitInfo, device: torch.device | str, local_rank: int = 0,
                 timeout_s: float | None = None) -> None:
        _check_init_info(info)
        check_matches_trainer(info, "this engine's process")
        self.info = info
        self.device = torch.device(device)
        if info.backend == "nccl" and self.device.type != "cuda":
            raise WeightUpdateError({"backend": "nccl needs a CUDA device; use gloo on CPU"})
        self.rank = info.rank_offset + local_rank
        self._staging: list[torch.Tensor] = []
        self._per_tensor_staging: dict[str, torch.Tensor] = {}
        self._memo = LayoutMemo()  # the packed layout of the last update and its views into staging
        self._ring: list[torch.Tensor] = []  # the two bucket-sized buffers of streamed updates
        self._ring_memo = LayoutMemo()  # the last streamed layout: bucket sizes and views into the ring
        timeout_s = float(info.extra.get("timeout_s", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
        try:
            self.store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
            if self.store.check([_abandoned_key(info.group_name)]):
                reason = self.store.get(_abandoned_key(info.group_name)).decode(errors="replace")
                raise WeightUpdateError({"init_info": f"the trainer abandoned group {info.group_name!r} before "
                                                      f"this engine joined: {reason}"})
            self.group = new_group(self.store, self.rank, info.world_size, info.backend, info.group_name,
                                   _local_host(info.master_addr), timeout_s)
        except dist.DistError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightUpdateError({"init_info": (
                f"group {info.group_name!r} at {info.master_addr}:{info.master_port} did not form ({first_line}). "
                f"The trainer abandons a group when another engine fails to join it (its error says why); "
                f"otherwise check that the trainer is up and reachable at that address")}) from None

    @property
    def staging_bytes(self) -> int:
        """Device memory this receiver holds between updates for staging and its ring."""
        held = [*self._staging, *self._ring, *self._per_tensor_staging.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def _check_payload(self, request: WeightUpdateRequest) -> str:
        payload = request.payload
        if not isinstance(payload, Mapping):
            raise WeightUpdateError({"payload": f"expected an object for strategy 'broadcast', "
                                                f"got {type(payload).__name__}"})
        group_name = payload.get("group_name")
        if group_name != self.info.group_name:
            raise WeightUpdateError({"payload.group_name": f"got {group_name!r} but this engine joined "
                                                           f"{self.info.group_name!r}"})
        layout = payload.get("layout", "packed")
        check_broadcast_modes(layout, payload.get("apply", "atomic"), "payload.")
        return layout

    def receive(self, request: WeightUpdateRequest) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of ``request``, all received before the first is yielded (a ``streamed``
        request too: use :meth:`receive_streamed` to apply it as it arrives)."""
        layout = self._check_payload(request)
        if layout == "per_tensor":
            return iter(self._receive_per_tensor(request))
        # The same layout as last time into the same staging (every step of a run): already
        # validated, views already made.
        pairs = self._memo.views(self._staging) if self._memo.matches(request) else None
        buckets = None if pairs is not None else parse_buckets(request)
        # Staging buffers are kept for the next update of the same layout (no new allocation, no
        # page faults); the views yielded last time have been copied into the engine by then.
        self._keep_only("staging")
        if buckets is not None:
            sizes = [m.nbytes for m, _ in buckets]
            if [b.numel() for b in self._staging] != sizes:
                self._staging = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        works = [self.group.broadcast([buffer], _root0()) for buffer in self._staging]
        for work in works:
            work.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if buckets is not None:
            pairs = [pair for (manifest, _), buffer in zip(buckets, self._staging, strict=True)
                     for pair in unpack(manifest, buffer)]
            self._memo.remember(request, self._staging, pairs)
        return iter(pairs)

    def receive_streamed(self, request: WeightUpdateRequest, load: LoadBucket) -> int:
        """Receive a packed update bucket by bucket and call ``load`` with each bucket's pairs as soon
        as it has arrived, while the next bucket is in flight. Returns the number of buckets loaded.

        Two bucket-sized buffers alternate. Bucket ``i + 2`` is received into the buffer of bucket
        ``i`` only once ``load`` has returned for bucket ``i``; on a GPU the collective is also queued
        behind the copies ``load`` queued on the current stream, so ``load`` need not synchronise."""
        if self._check_payload(request) != "packed":
            raise WeightUpdateError({"payload.layout": "streamed updates need the 'packed' layout"})
        self._keep_only("ring")  # a streamed update's memory is bounded by the ring alone
        remembered = self._ring_memo.views(self._ring) if self._ring_memo.matches(request) else None
        if remembered is None:
            buckets = parse_buckets(request)
            largest = max((manifest.nbytes for manifest, _ in buckets), default=0)
            count = min(2, len(buckets))
            if len(self._ring) != count or any(b.numel() < largest for b in self._ring):
                self._ring = []  # let go of the old ring before allocating the new one
                self._ring = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(count)]
            sizes = [manifest.nbytes for manifest, _ in buckets]
            groups = [list(unpack(manifest, self._ring[i % 2][:manifest.nbytes]))
                      for i, (manifest, _) in enumerate(buckets)]
            remembered = (sizes, groups)
            self._ring_memo.remember(request, self._ring, remembered)
        sizes, groups = remembered
        works: list[Any] = [None] * len(groups)

        def post(i: int) -> None:
            works[i] = self.group.broadcast([self._ring[i % 2][:sizes[i]]], _root0())

        for i in range(min(2, len(groups))):
            post(i)
        for i, pairs in enumerate(groups):
            works[i].wait()  # on a GPU: the current stream waits for the bucket, the host does not
            load(pairs)
            if i + 2 < len(groups):
                post(i + 2)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return len(groups)

    def _keep_only(self, kind: str) -> None:
        """Let go of the buffers of the other ways of receiving: an engine holds one mode's staging."""
        if kind != "staging":
            self._staging = []
            self._memo.forget()
        if kind != "ring":
            self._ring = []
            self._ring_memo.forget()
        if kind != "per_tensor":
            self._per_tensor_staging = {}

    def _receive_per_tensor(self, request: WeightUpdateRequest) -> list[tuple[str, torch.Tensor]]:
        self._keep_only("per_tensor")
        received = []
        staging: dict[str, torch.Tensor] = {}
        works = []
        for name, dtype, shape in zip(request.names, request.dtypes, request.shapes, strict=False):
            tensor = self._per_tensor_staging.get(name)
            if tensor is None or tensor.dtype != getattr(torch, dtype) or tuple(tensor.shape) != tuple(shape):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            staging[name] = tensor
            works.append(self.group.broadcast([tensor], _root0()))
            received.append((name, tensor))
        for work in works:
            work.wait()
        self._per_tensor_staging = staging
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return received

    def close(self) -> None:
        self.group = None
        self.store = None
        self._keep_only("nothing")


def _root0() -> Any:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    return options


class BroadcastSender:
    """Trainer side: rank 0 of the group. Create the store with :meth:`listen`, hand
    :meth:`init_info` to each engine (``init_weight_update_communicator``) while :meth:`join` runs,
    then :meth:`send` once per update, concurrently with the engines' ``update_named_weights``.
    ``sync_weights`` and :func:`connect_broadcast` do this choreography for you."""

    strategy = STRATEGY

    def __init__(self, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 0,
                 backend: str = "gloo", group_name: str = "skyrl_weight_sync", device: torch.device | str = "cpu",
                 timeout_s: float = DEFAULT_TIMEOUT_S, layout: str = "packed", apply: str = "atomic") -> None:
        if backend not in BACKENDS:
            raise WeightUpdateError({"backend": f"got {backend!r}; expected one of {list(BACKENDS)}"})
        check_broadcast_modes(layout, apply)
        self.layout = layout
        self.apply = apply
        self.world_size = world_size
        self.master_addr = master_addr
        self.backend = backend
        self.group_name = group_name
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        # The store's server is kept apart from the client this rank joins through, so that
        # abandon() can take it down while a join (this rank's or an engine's) is blocked in it.
        self._server: Any = dist.TCPStore(master_addr, master_port, world_size, is_master=True, timeout=timeout,
                                          wait_for_workers=False)
        self.master_port = self._server.port
        self.store: Any = dist.TCPStore(master_addr, self.master_port, world_size, is_master=False, timeout=timeout)
        self.group: Any = None
        self._buffers: list[torch.Tensor] = []
        self._packer = Packer()
        self._shared_ring: list[Any] = []  # shared-memory segments of the ring, for a sharded trainer

    def init_info(self, rank_offset: int) -> WeightSyncInitInfo:
        return WeightSyncInitInfo(master_addr=self.master_addr, master_port=self.master_port, rank_offset=rank_offset,
                                  world_size=self.world_size, group_name=self.group_name, backend=self.backend,
                                  strategy=STRATEGY, extra=self._extra())

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"timeout_s": self.timeout_s}
        if self.backend == "nccl":  # engine ranks check they share GPU memory as NCCL does here
            extra[INIT_INFO_KEY] = cumem_setting()
        return extra

    def join(self) -> None:
        """Blocks until every engine rank has joined."""
        self.group = new_group(self.store, 0, self.world_size, self.backend, self.group_name,
                               _local_host(self.master_addr), self.timeout_s)

    async def join_with(self, engine_joins: Sequence[Awaitable[Any]]) -> None:
        """Join (in a thread) while the engines join (``engine_joins``: their
        ``init_weight_update_communicator`` calls). The first failure abandons the group: every rank
        still waiting for it is released at once instead of at the group's timeout, and that first
        failure is raised."""
        tasks = [asyncio.ensure_future(asyncio.to_thread(self.join)), *map(asyncio.ensure_future, engine_joins)]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            reason = ("the trainer's call was cancelled" if isinstance(exc, asyncio.CancelledError)
                      else f"another member failed to join: {type(exc).__name__}: {exc}")[:2000]
            self.abandon(reason)
            # Released ranks fail within about a second. A rank that connected to the marker store
            # before its key was set waits in it: the marker is put up again every few seconds
            # while a join is still running, which releases it. An engine call that does not
            # return (a hung server) is not waited for beyond the grace period.
            pending = set(tasks)
            deadline = asyncio.get_running_loop().time() + ABANDON_GRACE_S
            while pending and (left := deadline - asyncio.get_running_loop().time()) > 0:
                _, pending = await asyncio.wait(pending, timeout=min(MARKER_RENEWAL_S, left))
                if pending:
                    self.abandon(reason)
            for task in pending:
                task.cancel()
            for task in tasks:  # retrieved, so that the released ranks' errors are not reported as lost
                if task.done() and not task.cancelled():
                    task.exception()
            self.close()  # every join has ended: the port is free for the trainer's next group
            raise

    def abandon(self, reason: str = "another member failed to join") -> None:
        """Give up on the group before it forms: every rank waiting for it (this one's :meth:`join`,
        engines joining through skyrl's receiver or natively) fails within about a second instead of
        at the timeout, and the engines are free for the trainer's next group. The sender cannot be
        used afterwards.

        The store's server is taken down, which closes every waiting rank's connection, and a new
        one on the same port says the group was abandoned (and why) to a receiver that connects
        later (a client that found no server would retry until the timeout), until :meth:`close`.
        Calling it again puts that marker up anew, releasing a rank that connected to it before
        its key was set."""
        if self.store is None:  # closed: nothing to abandon, and the port is not ours any more
            return
        self.group = None
        self._server = None  # the only reference: its connections close now
        try:
            self._server = dist.TCPStore(self.master_addr, self.master_port, self.world_size, is_master=True,
                                         timeout=datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)
            self._server.set(_abandoned_key(self.group_name), reason)
        except dist.DistError:
            self._server = None  # the port was taken meanwhile: a late receiver waits out its timeout

    def payload(self, layout: PackPlan) -> dict[str, Any]:
        check_broadcast_modes(self.layout, self.apply)  # both are attributes a trainer may change between updates
        return {"group_name": self.group_name, "layout": self.layout, "apply": self.apply,
                **layout.payload()}

    def send(self, layout: PackPlan) -> None:
        """Pack and broadcast every bucket in order (blocking). Two buffers of the largest bucket
        alternate, so packing the next bucket overlaps the collective of the previous one; the
        sender never holds more than two packed buckets."""
        if self.group is None:
            raise WeightUpdateError({"communicator": "the group is not joined; call join() first"})
        if self.layout == "per_tensor":
            in_flight = []  # (tensor, work): a converted tensor must live until its collective is done
            for name, dtype in zip(layout.names, layout.dtypes, strict=False):
                tensor = layout.tensors[name].to(device=self.device, dtype=getattr(torch, dtype)).contiguous()
                in_flight.append((tensor, self.group.broadcast([tensor], _root0())))
            for _, work in in_flight:
                work.wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            return
        ring = self.ring(layout)
        pending: list[Any] = [None, None]
        targets = [ring[i % 2][:manifest.nbytes] for i, manifest in enumerate(layout.buckets)]
        self._packer.prepare(targets, layout)
        for i, buffer in enumerate(targets):
            slot = i % 2
            if pending[slot] is not None:  # the collective that last read this buffer
                pending[slot].wait()
            self._packer.pack_bucket(i, layout)
            pending[slot] = self.group.broadcast([buffer], _root0())
        for work in pending:
            if work is not None:
                work.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def ring(self, layout: PackPlan, shared: bool = False) -> list[torch.Tensor]:
        """The two buffers of the largest bucket that buckets alternate in (kept between updates).
        ``shared``: in shared-memory segments (CPU only), which the other ranks of a sharded trainer
        on this machine write their shards into (:attr:`ring_segment_names`)."""
        largest = max((b.nbytes for b in layout.buckets), default=0)
        count = min(2, len(layout.buckets))
        if shared:
            if len(self._shared_ring) < count or any(s.nbytes < largest for s in self._shared_ring[:count]):
                from skyrl_backends.weight_sync.shared_memory import Segment

                self._release_shared_ring()
                self._shared_ring = [Segment(largest) for _ in range(count)]
            return [segment.tensor for segment in self._shared_ring[:count]]
        if len(self._buffers) < count or any(b.numel() < largest for b in self._buffers[:count]):
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(count)]
        return self._buffers[:count]

    @property
    def ring_segment_names(self) -> list[str]:
        return [segment.name for segment in self._shared_ring]

    def send_assembled(self, layout: PackPlan, ring: list[torch.Tensor],
                       fill: Callable[[int, torch.Tensor], None]) -> None:
        """Broadcast every bucket of ``layout`` after ``fill(index, buffer)`` wrote it into its slot of
        ``ring`` (from :meth:`ring`), in order, in the sender's layout and with at most two buckets
        in flight: a sharded trainer's ranks assemble each bucket while the previous one travels."""
        if self.group is None:
            raise WeightUpdateError({"communicator": "the group is not joined; call join() first"})
        check_broadcast_modes(self.layout, self.apply)
        pending: list[list[Any]] = [[], []]
        for i, manifest in enumerate(layout.buckets):
            slot = i % 2
            for work in pending[slot]:  # the collectives that last read this buffer
                work.wait()
            buffer = ring[slot][:manifest.nbytes]
            fill(i, buffer)
            if self.layout == "per_tensor":  # typed views of the bucket, in the request's order
                pending[slot] = [self.group.broadcast([tensor], _root0()) for _, tensor in unpack(manifest, buffer)]
            else:
                pending[slot] = [self.group.broadcast([buffer], _root0())]
        for works in pending:
            for work in works:
                work.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _release_shared_ring(self) -> None:
        for segment in self._shared_ring:
            segment.release()
        self._shared_ring = []

    def close(self) -> None:
        """Let go of the group and take the store's server down: a rank still waiting in it (a group
        that never formed) fails within about a second."""
        self.group = None
        self._buffers = []
        self._release_shared_ring()
        self.store = None
        self._server = None
