"""Weight sync when the trainer is elsewhere: a torch.distributed group of the trainer and the engines.

Rank 0 is the trainer; engine ranks start at ``rank_offset`` (an engine with several workers, e.g.
tensor-parallel, joins with ``rank_offset + local_rank`` per worker). The group is NCCL on GPU and
gloo on CPU. It is built directly on its own ``TCPStore`` (prefixed with the group name), never as
torch's default process group, because the engine may already own one (vLLM and SGLang do).

Per update the request carries only the manifests (names, dtypes, shapes, offsets); the bytes follow
as one ``broadcast`` per packed bucket from rank 0. The receiver receives every bucket before it
yields a tensor, so a transfer that fails midway (a timeout, a dead trainer) changes nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync.chunks import PackPlan, pack_into, unpack
from skyrl_backends.weight_sync.manifest import parse_buckets

STRATEGY = "broadcast"
BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0


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
    """A process group of ``world_size`` ranks over ``store`` (blocks until every rank joins)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(group_name, store)
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


def _local_host(master_addr: str) -> str:
    # gloo binds to the address that reaches the master; on one machine that is the loopback.
    return "127.0.0.1" if master_addr in ("127.0.0.1", "localhost", "::1") else ""


class BroadcastReceiver:
    """Engine side: one rank of the trainer's group (created by ``make_receiver``)."""

    def __init__(self, info: WeightSyncInitInfo, device: torch.device | str, local_rank: int = 0,
                 timeout_s: float | None = None) -> None:
        _check_init_info(info)
        self.info = info
        self.device = torch.device(device)
        if info.backend == "nccl" and self.device.type != "cuda":
            raise WeightUpdateError({"backend": "nccl needs a CUDA device; use gloo on CPU"})
        self.rank = info.rank_offset + local_rank
        timeout_s = float(info.extra.get("timeout_s", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
        self.store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.group = new_group(self.store, self.rank, info.world_size, info.backend, info.group_name,
                               _local_host(info.master_addr), timeout_s)

    def receive(self, request: WeightUpdateRequest) -> Iterator[tuple[str, torch.Tensor]]:
        buckets = parse_buckets(request)
        group_name = request.payload.get("group_name")
        if group_name != self.info.group_name:
            raise WeightUpdateError({"payload.group_name": f"got {group_name!r} but this engine joined "
                                                           f"{self.info.group_name!r}"})
        staged = []
        for manifest, _ in buckets:
            buffer = torch.empty(manifest.nbytes, dtype=torch.uint8, device=self.device)
            self.group.broadcast([buffer], _root0()).wait()
            staged.append((manifest, buffer))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return (pair for manifest, buffer in staged for pair in unpack(manifest, buffer))

    def close(self) -> None:
        self.group = None
        self.store = None


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
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if backend not in BACKENDS:
            raise WeightUpdateError({"backend": f"got {backend!r}; expected one of {list(BACKENDS)}"})
        self.world_size = world_size
        self.master_addr = master_addr
        self.backend = backend
        self.group_name = group_name
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(master_addr, master_port, world_size, is_master=True,
                                   timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.master_port = self.store.port
        self.group: Any = None
        self._buffer: torch.Tensor | None = None

    def init_info(self, rank_offset: int) -> WeightSyncInitInfo:
        return WeightSyncInitInfo(master_addr=self.master_addr, master_port=self.master_port, rank_offset=rank_offset,
                                  world_size=self.world_size, group_name=self.group_name, backend=self.backend,
                                  strategy=STRATEGY, extra={"timeout_s": self.timeout_s})

    def join(self) -> None:
        """Blocks until every engine rank has joined."""
        self.group = new_group(self.store, 0, self.world_size, self.backend, self.group_name,
                               _local_host(self.master_addr), self.timeout_s)

    def payload(self, layout: PackPlan) -> dict[str, Any]:
        return {"group_name": self.group_name, "buckets": [b.to_json() for b in layout.buckets]}

    def send(self, layout: PackPlan) -> None:
        """Pack and broadcast every bucket in order (blocking). One staging buffer of the largest
        bucket is reused: the sender never holds more than one packed bucket."""
        if self.group is None:
            raise WeightUpdateError({"communicator": "the group is not joined; call join() first"})
        largest = max((b.nbytes for b in layout.buckets), default=0)
        if self._buffer is None or self._buffer.numel() < largest:
            self._buffer = torch.empty(largest, dtype=torch.uint8, device=self.device)
        for manifest in layout.buckets:
            buffer = self._buffer[:manifest.nbytes]
            pack_into(buffer, manifest, layout.tensors)
            self.group.broadcast([buffer], _root0()).wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        self.group = None
        self._buffer = None
        self.store = None
