"""Weight transfer in phases, as vLLM's RL API speaks it, mapped onto the engine API.

vLLM's protocol (``vllm serve --weight-transfer-config '{"backend": NAME}'``, and its trainer-side
engines) moves weights in four calls: ``init_weight_transfer_engine(init_info)`` once,
then per update ``start_weight_update()``, ``update_weights(update_info)`` one or more times (the
chunks), ``finish_weight_update(weight_version)``. ``init_info`` and ``update_info`` are plain JSON
objects whose shape the named backend defines.

This module defines the backend named :data:`BACKEND` (``"skyrl"``): skyrl's weight-sync strategies
in that protocol. Its payloads are skyrl's wire format, so nothing new crosses the wire:

``init_info``
    ``{"strategy": "shared_memory"}``, ``{"strategy": "cuda_ipc"}``, or for ``"broadcast"`` a
    :class:`~skyrl_backends.types.WeightSyncInitInfo` as JSON (the trainer's group: address, port,
    the first engine rank, the world size, gloo or NCCL).
``update_info``
    one :class:`~skyrl_backends.types.WeightUpdateRequest` as JSON
    (:func:`skyrl_backends.weight_sync.manifest.request_to_json`): names, dtypes, shapes and the
    strategy's payload (segment names, IPC handles, or the broadcast's bucket manifests).

The same payloads are received by three receivers: :class:`PhasedWeightTransfer` here (the routes
of ``skyrl-backends serve``, over any backend, :mod:`skyrl_backends.http.vllm_rl_routes`), the vLLM
plugin's ``WeightTransferEngine`` inside vLLM's workers (``vllm serve`` itself, and the plugin's own
engines), and trainers send them with the plugin's trainer-side engine through vLLM's own clients.

Torch-free: the server validates and dispatches; the engines receive the bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from skyrl_backends.errors import ConfigError, EngineStateError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync.manifest import TRANSPORT_STRATEGIES, request_from_json, request_to_json

BACKEND = "skyrl"
# vLLM's label of the weights an engine was started with (its engine core's initial version).
INITIAL_VERSION = "default"
CONFIG_FLAG = "--weight-transfer-config"
NOT_CONFIGURED = ("Weight transfer not configured. Please set weight_transfer_config to enable weight transfer "
                  f"(start the server with {CONFIG_FLAG} '{{\"backend\": \"{BACKEND}\"}}').")


# -- the backend's payloads ------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferInit:
    """What ``init_weight_transfer_engine`` set up: the strategy, and the trainer's group for a
    broadcast (None otherwise)."""

    strategy: str
    group: WeightSyncInitInfo | None = None


def init_info_to_json(init: TransferInit | WeightSyncInitInfo | str) -> dict[str, Any]:
    """The ``init_info`` of :data:`BACKEND`: a strategy name, or a broadcast group."""
    if isinstance(init, str):
        init = TransferInit(init)
    if isinstance(init, WeightSyncInitInfo):
        return dataclasses.asdict(init)
    if init.group is not None:
        return dataclasses.asdict(init.group)
    return {"strategy": init.strategy}


def init_info_from_json(value: Any) -> TransferInit:
    """Parse and check an ``init_info`` of :data:`BACKEND` (``ConfigError`` naming the field)."""
    if not isinstance(value, Mapping):
        raise ConfigError("init_info", f"expected a JSON object, got {type(value).__name__}")
    strategy = value.get("strategy", "broadcast")
    if strategy not in TRANSPORT_STRATEGIES:
        raise ConfigError("init_info.strategy", f"got {strategy!r}; expected one of {list(TRANSPORT_STRATEGIES)}")
    if strategy != "broadcast":
        extra = sorted(set(value) - {"strategy"})
        if extra:
            raise ConfigError(f"init_info.{extra[0]}", f"is not a field of a {strategy!r} init_info (only 'strategy')")
        return TransferInit(strategy)
    known = {f.name for f in dataclasses.fields(WeightSyncInitInfo)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"init_info.{unknown[0]}",
                          f"is not a field of a broadcast init_info; fields: {sorted(known)}")
    for name in ("master_addr", "group_name", "backend"):
        if name in value and not isinstance(value[name], str):
            raise ConfigError(f"init_info.{name}", f"expected a string, got {value[name]!r}")
    for name in ("master_port", "rank_offset", "world_size"):
        if name not in value:
            raise ConfigError(f"init_info.{name}", "is required for a broadcast")
        if isinstance(value[name], bool) or not isinstance(value[name], int):
            raise ConfigError(f"init_info.{name}", f"expected an integer, got {value[name]!r}")
    if "master_addr" not in value:
        raise ConfigError("init_info.master_addr", "is required for a broadcast")
    if "extra" in value and not isinstance(value["extra"], Mapping):
        raise ConfigError("init_info.extra", f"expected a JSON object, got {value['extra']!r}")
    if value["world_size"] < 2 or not 1 <= value["rank_offset"] < value["world_size"]:
        raise ConfigError("init_info.rank_offset", f"got rank_offset={value['rank_offset']} in a world of "
                                                   f"{value['world_size']}; the trainer is rank 0, engine ranks are "
                                                   f"1..world_size-1")
    group = WeightSyncInitInfo(**{k: (dict(v) if k == "extra" else v) for k, v in value.items()})
    return TransferInit("broadcast", group)


def update_info_to_json(request: WeightUpdateRequest) -> dict[str, Any]:
    """The ``update_info`` of :data:`BACKEND`: one request, as skyrl's wire format writes it."""
    return request_to_json(request)


def update_info_from_json(value: Any) -> WeightUpdateRequest:
    """Parse an ``update_info`` of :data:`BACKEND`. vLLM also accepts a list indexed by worker rank
    (per-rank payloads); every engine here receives the same request, so a list must hold one
    request, or the same one for every rank."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("update_info", "is an empty list; send one request")
        if any(item != value[0] for item in value[1:]):
            raise NotImplementedError("per-rank update_info (a list of different requests) is not supported by the "
                                      f"{BACKEND!r} backend: every engine receives the same request; send one object")
        value = value[0]
    return request_from_json(value)


def parse_weight_transfer_config(value: str | Mapping[str, Any] | None) -> str | None:
    """The backend named by ``--weight-transfer-config`` (JSON, as vLLM's flag takes it), or None when
    not given. Only :data:`BACKEND` is received here; vLLM's own backends (``nccl``, ``ipc``, ...) run
    inside vLLM's workers, so naming one is refused as vLLM refuses an unknown backend."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError("weight_transfer_config", f"is not JSON ({exc}); e.g. '{{\"backend\": \"{BACKEND}\"}}'") \
                from None
    if not isinstance(value, Mapping):
        raise ConfigError("weight_transfer_config", f"expected a JSON object, got {value!r}")
    unknown = sorted(set(value) - {"backend"})
    if unknown:
        raise ConfigError(f"weight_transfer_config.{unknown[0]}", "unknown key; the config has one key, 'backend'")
    backend = value.get("backend", "nccl")  # vLLM's default
    if backend != BACKEND:
        raise ConfigError("weight_transfer_config.backend",
                          f"Invalid weight transfer backend: {backend}. Available engines: [{BACKEND!r}] (vLLM's "
                          f"own backends, such as 'nccl' and 'ipc', run in vLLM's workers: use `vllm serve` for "
                          f"them, or the {BACKEND!r} backend's broadcast and cuda_ipc strategies here)")
    return backend


# -- the engine's ranks ------------------------------------------------------------------------------
def engine_ranks(engine: Any) -> list[int]:
    """Ranks each engine behind ``engine`` (a client's pool, or one engine) takes in a broadcast
    group: its tensor x pipeline parallel workers."""
    pool = getattr(engine, "engines", None)
    members = list(pool) if isinstance(pool, (list, tuple)) else [engine]
    ranks = []
    for member in members:
        sizes = member.parallel_sizes() if callable(getattr(member, "parallel_sizes", None)) else None
        ranks.append(int(sizes.tensor) * int(sizes.pipeline) if sizes is not None and hasattr(sizes, "tensor") else 1)
    return ranks


def world_size(engine: Any, include_dp: bool = True) -> int:
    """vLLM's ``/get_world_size``: every engine rank (``include_dp``: across the pool, which plays
    vLLM's data-parallel replicas), or one engine's."""
    ranks = engine_ranks(engine)
    return sum(ranks) if include_dp else ranks[0]


# -- the server side -------------------------------------------------------------------------------
class PhasedWeightTransfer:
    """The four phases over an engine (in ``skyrl-backends serve``: the client over its pool).

    * ``init``: a broadcast's engines join the trainer's group, engine after engine at consecutive
      ranks from the trainer's ``rank_offset``; colocated strategies need no set-up.
    * ``start`` / ``finish``: bracket an update, as vLLM's workers do (one at a time; ``finish``
      records the trainer's version label, which ``/weight_info`` reports).
    * ``update``: one chunk is one request, validated by every engine before any applies it and
      applied all or nothing, so a rejected or failed chunk changes no weight (vLLM's own path has
      started reloading by then). The engine's integer ``weight_version`` counts chunks applied.

    Calls are serialised, as vLLM's workers run them one after the other.
    """

    def __init__(self, engine: Any, backend: str | None) -> None:
        self.engine = engine
        self.backend = backend
        self.version = INITIAL_VERSION
        self.active = False
        self.init: TransferInit | None = None
        self._lock = asyncio.Lock()

    def _check_configured(self) -> None:
        if self.backend is None:
            raise EngineStateError(NOT_CONFIGURED)

    async def initialize(self, init_info: Any) -> None:
        self._check_configured()
        init = init_info_from_json(init_info)
        async with self._lock:
            if init.group is not None:
                await self._join(init.group)
            self.init = init

    async def _join(self, group: WeightSyncInitInfo) -> None:
        ranks = engine_ranks(self.engine)
        if group.rank_offset + sum(ranks) > group.world_size:
            raise ConfigError("init_info.world_size",
                              f"got {group.world_size} with rank_offset {group.rank_offset}, but this server's engines "
                              f"take {sum(ranks)} ranks (GET /get_world_size): the group needs at least "
                              f"{group.rank_offset + sum(ranks)} ranks")
        infos, offset = [], group.rank_offset
        for count in ranks:
            infos.append(dataclasses.replace(group, rank_offset=offset))
            offset += count
        pool = getattr(self.engine, "engines", None)
        await self.engine.init_weight_update_communicator(infos if isinstance(pool, (list, tuple)) else infos[0])

    async def start(self) -> None:
        self._check_configured()
        async with self._lock:
            if self.active:
                raise EngineStateError("start_weight_update called while a weight update is already active. "
                                       "Call finish_weight_update first.")
            self.active = True

    async def update(self, update_info: Any) -> int:
        """Apply one chunk; returns the engine's new integer weight version."""
        self._check_configured()
        request = update_info_from_json(update_info)
        async with self._lock:
            if not self.active:
                raise EngineStateError("start_weight_update must be called before update_weights.")
            try:
                return int(await self.engine.update_named_weights(request))
            except BaseException:
                self.active = False  # as vLLM's worker: a failed chunk ends the update
                raise

    async def finish(self, weight_version: str | None = None) -> None:
        self._check_configured()
        async with self._lock:
            if not self.active:
                raise EngineStateError("finish_weight_update called without a matching start_weight_update.")
            self.active = False
            if weight_version is not None:
                self.version = weight_version

    async def shutdown(self) -> None:
        """Release the trainer connection. A broadcast group's members stay joined until the engine
        joins another (the engine API has no call to leave one); the next ``init`` replaces it."""
        async with self._lock:
            if self.active:
                raise EngineStateError("Cannot release a trainer connection during a weight update")
            self.init = None


__all__ = ["BACKEND", "INITIAL_VERSION", "PhasedWeightTransfer", "TransferInit", "engine_ranks",
           "init_info_from_json", "init_info_to_json", "parse_weight_transfer_config", "update_info_from_json",
           "update_info_to_json", "world_size"]
