"""Engines as Ray actors, behind the same async API as an in-process engine.

* :class:`RayWrappedInferenceEngine` is the actor: it builds its engine with
  :func:`skyrl_backends.create_engine` inside the actor process (the engine is never pickled) and
  forwards every call to it; ``generate_stream`` is a Ray streaming generator
  (``num_returns="streaming"``), so chunks cross the process boundary as they are produced.
* :class:`RayEngineProxy` is what the trainer and :class:`~skyrl_backends.client.InferenceEngineClient`
  hold: the engine API over the actor handle, so the client cannot tell it from a local engine. A
  dead or unreachable actor surfaces as :class:`~skyrl_backends.errors.EngineDeadError` (which the
  client fails over); the engine's own errors (bad sampling parameters, a rejected weight update)
  arrive as the same exception types as in-process.
* :func:`create_ray_engines` places the actors: on a placement group of their own (one bundle per
  engine, ``num_gpus_per_engine`` GPUs each; ``placement_strategy="STRICT_SPREAD"`` puts each engine
  on a node of its own), or on bundles of the trainer's placement group with a fractional GPU each
  (``colocate``), as the design's ``colocate_all`` does.
* :func:`restart_ray_engine` starts a lost engine again, with the same options and resources, on
  any live node (:class:`~skyrl_backends.client.recovery.EngineRecovery` puts it back into a pool).

Only this module (and ``skyrl-backends serve --ray``) imports ray; ``pip install 'skyrl-backends[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import ConfigError, EngineDeadError
from skyrl_backends.protocols import Prompts, SamplingInput
from skyrl_backends.types import (
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    StreamChunk,
    TensorSpec,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)

DEFAULT_START_TIMEOUT_S = 300.0
# How often, and how long, a restart asks Ray whether the lost engine's node is marked dead.
_NODE_DEATH_POLL_S = 0.5
_NODE_DEATH_WAIT_S = 10.0

logger = logging.getLogger(__name__)

# Errors meaning "the actor is gone or cannot be reached", as opposed to an error the engine raised.
_ACTOR_FAILURES: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(ray.exceptions, name, None) for name in (
        "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError",
        "WorkerCrashedError", "NodeDiedError", "LocalRaySystemError", "RaySystemError", "ObjectLostError",
        "OwnerDiedError"))
    if isinstance(cls, type))


class RayWrappedInferenceEngine:
    """The actor body. Created through :func:`create_ray_engines` (or ``ray.remote(...)`` of this
    class); ``options`` are ``create_engine`` keywords (a generator config's fields)."""

    def __init__(self, backend: str, model: str | None, options: dict[str, Any]) -> None:
        from skyrl_backends.api import create_engine

        self.engine = create_engine(backend, model=model, **options)

    def describe(self) -> dict[str, Any]:
        """What the proxy caches: fixed for the engine's life."""
        engine = self.engine
        return {"backend": engine.backend, "capabilities": engine.capabilities, "config": engine.config,
                "distribution": engine.distribution, "parallel_sizes": engine.parallel_sizes(),
                "engine_version": engine.engine_version(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def ping(self) -> bool:
        return True

    async def generate(self, request: Prompts, sampling_params: SamplingInput = None,
                       **request_fields: Any) -> GenerateOutput:
        return await self.engine.generate(request, sampling_params, **request_fields)

    async def generate_stream(self, request: Prompts, sampling_params: SamplingInput = None,
                              **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """Called with ``num_returns="streaming"``: each chunk reaches the caller as it is yielded."""
        async for chunk in self.engine.generate_stream(request, sampling_params, **request_fields):
            yield chunk

    async def abort(self, request_ids: Sequence[str] | None = None) -> None:
        await self.engine.abort(request_ids)

    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        await self.engine.pause_generation(mode, recompute=recompute)

    async def resume_generation(self) -> None:
        await self.engine.resume_generation()

    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        await self.engine.sleep(tags, level, abort_first=abort_first, drain_timeout=drain_timeout)

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        await self.engine.wake_up(tags)

    async def weight_specs(self) -> dict[str, TensorSpec]:
        return await self.engine.weight_specs()

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        await self.engine.validate_weight_update(request)

    async def init_weight_update_communicator(
            self, init_info: WeightSyncInitInfo | Sequence[WeightSyncInitInfo]) -> None:
        await self.engine.init_weight_update_communicator(init_info)

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        return await self.engine.update_named_weights(request)

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int:
        return await self.engine.update_weights_from_tensors(named_tensors)

    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str],
                                pinned: bool = False) -> None:
        await self.engine.load_lora_adapter(lora_name, lora_path, pinned)

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        await self.engine.validate_lora_adapter_from_tensors(lora_name, lora_config, request)

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        return await self.engine.load_lora_adapter_from_tensors(lora_name, lora_config, request, pinned)

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self.engine.unload_lora_adapter(lora_name)

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def state(self) -> dict[str, Any]:
        engine = self.engine
        return {"weight_version": engine.weight_version, "asleep": sorted(engine.asleep_tags),
                "weights_loaded": engine.weights_loaded, "closed": engine.closed, "paused": engine.paused,
                "pause_mode": engine.pause_mode,
                "num_inflight": engine.num_inflight, "lora_adapters": engine.lora_adapters,
                "lora_versions": engine.lora_versions}

    async def teardown(self) -> None:
        await self.engine.teardown()

    # Fixed for the engine's life: the proxy caches them from describe().
    def parallel_sizes(self) -> ParallelSizes:
        return self.engine.parallel_sizes()

    def engine_version(self) -> str | None:
        return self.engine.engine_version()


class PlacementLease:
    """A placement group created for engines, held by each engine placed in it and removed when the
    last of them is torn down, so that a torn-down pool leaves the cluster's CPUs and GPUs free. A
    restarted engine takes over its predecessor's hold."""

    def __init__(self, group: PlacementGroup, holders: int) -> None:
        self.group = group
        self.holders = holders

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            ray.util.remove_placement_group(self.group)


@dataclass
class RayEngineProxy:
    """The engine API over a :class:`RayWrappedInferenceEngine` actor handle."""

    actor: Any
    name: str
    backend: str
    capabilities: Capabilities
    config: Any
    distribution: str | None = None
    _parallel_sizes: ParallelSizes = ParallelSizes()
    _engine_version: str | None = None
    pid: int | None = None
    weight_version: int = 0
    closed: bool = False
    node_id: str | None = None
    # How the actor was started (backend, model, engine options, resources): what a restart repeats.
    spawn: dict[str, Any] | None = None
    # This engine's hold on a placement group created for engines (by create_ray_engines or a restart),
    # which goes when its last engine is torn down.
    lease: PlacementLease | None = None
    # The placement group and bundle the actor was scheduled on (a restart goes back to the bundle).
    placement: tuple[Any, int] | None = None
    _weight_specs: dict[str, TensorSpec] | None = None  # asked once (weight_specs)

    def __repr__(self) -> str:
        return f"<RayEngineProxy {self.name} backend={self.backend!r} pid={self.pid} node={self.node_id}>"

    @classmethod
    def from_actor(cls, actor: Any, name: str, timeout_s: float = DEFAULT_START_TIMEOUT_S,
                   spawn: dict[str, Any] | None = None) -> RayEngineProxy:
        """Wait for the actor's engine to start and cache what never changes."""
        try:
            info = ray.get(actor.describe.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EngineDeadError(f"Ray engine {name} did not start within {timeout_s}s; check that the "
                                  f"cluster has the CPUs/GPUs its placement asks for.") from None
        except _ACTOR_FAILURES as exc:
            raise EngineDeadError(f"Ray engine {name} failed to start: {exc}") from exc
        return cls(actor=actor, name=name, backend=info["backend"], capabilities=info["capabilities"],
                   config=info["config"], distribution=info["distribution"], _parallel_sizes=info["parallel_sizes"],
                   _engine_version=info["engine_version"], pid=info["pid"], node_id=info.get("node_id"),
                   spawn=spawn)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.actor, method).remote(*args, **kwargs)
        except _ACTOR_FAILURES as exc:
            # An engine error raised inside the actor arrives as RayTaskError, which is also an
            # instance of the original class; only failures of the actor itself land here.
            raise EngineDeadError(f"Ray engine {self.name} is unreachable ({type(exc).__name__}): "
                                  f"{_first_line(exc)}") from exc

    async def generate(self, request: Prompts, sampling_params: SamplingInput = None,
                       **request_fields: Any) -> GenerateOutput:
        return await self._call("generate", GenerateRequest.coerce(request, sampling_params, request_fields))

    async def generate_stream(self, request: Prompts, sampling_params: SamplingInput = None,
                              **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """The actor's chunks as it yields them, through a Ray streaming generator."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        try:
            async for ref in self.actor.generate_stream.options(num_returns="streaming").remote(request):
                yield await ref
        except _ACTOR_FAILURES as exc:
            raise EngineDeadError(f"Ray engine {self.name} is unreachable ({type(exc).__name__}): "
                                  f"{_first_line(exc)}") from exc

    async def abort(self, request_ids: Sequence[str] | None = None) -> None:
        await self._call("abort", list(request_ids) if request_ids is not None else None)

    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        await self._call("pause_generation", mode, recompute=recompute)

    async def resume_generation(self) -> None:
        await self._call("resume_generation")

    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        await self._call("sleep", list(tags) if tags is not None else None, level, abort_first=abort_first,
                         drain_timeout=drain_timeout)

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        await self._call("wake_up", list(tags) if tags is not None else None)

    async def weight_specs(self) -> dict[str, TensorSpec]:
        """The engine's parameters, asked once: they do not change shape (``sync_weights`` reads
        them at every sync, and each ask is a round trip to the actor)."""
        if self._weight_specs is None:
            self._weight_specs = await self._call("weight_specs")
        return dict(self._weight_specs)

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        # Validation needs names, shapes and dtypes only: do not ship the tensors twice.
        described = WeightUpdateRequest(names=request.names, dtypes=request.dtypes, shapes=request.shapes,
                                        strategy=request.strategy, payload=None)
        await self._call("validate_weight_update", described)

    async def init_weight_update_communicator(
            self, init_info: WeightSyncInitInfo | Sequence[WeightSyncInitInfo]) -> None:
        await self._call("init_weight_update_communicator", init_info)

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        self.weight_version = await self._call("update_named_weights", request)
        return self.weight_version

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int:
        return await self.update_named_weights(WeightUpdateRequest.from_named_tensors(list(named_tensors)))

    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str],
                                pinned: bool = False) -> None:
        await self._call("load_lora_adapter", lora_name, os.fspath(lora_path), pinned)

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        # Validation needs names, shapes and dtypes (and a broadcast's layout): not the tensors themselves.
        described = WeightUpdateRequest(names=request.names, dtypes=request.dtypes, shapes=request.shapes,
                                        strategy=request.strategy,
                                        payload=None if request.strategy == "tensors" else request.payload)
        await self._call("validate_lora_adapter_from_tensors", lora_name, dict(lora_config), described)

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        return await self._call("load_lora_adapter_from_tensors", lora_name, dict(lora_config), request, pinned)

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._call("unload_lora_adapter", lora_name)

    async def reset_prefix_cache(self) -> None:
        await self._call("reset_prefix_cache")

    async def state(self) -> dict[str, Any]:
        return await self._call("state")

    async def ping(self) -> bool:
        return await self._call("ping")

    def parallel_sizes(self) -> ParallelSizes:
        return self._parallel_sizes

    def engine_version(self) -> str | None:
        return self._engine_version

    async def teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._call("teardown")
        finally:
            ray.kill(self.actor, no_restart=True)
            lease, self.lease = self.lease, None
            if lease is not None:
                lease.release()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def engine_placement_group(num_engines: int, num_gpus_per_engine: float = 0.0, num_cpus_per_engine: float = 1.0,
                           strategy: str = "PACK", timeout_s: float = DEFAULT_START_TIMEOUT_S) -> PlacementGroup:
    """A placement group with one bundle per engine (engines on their own GPUs), ready to use."""
    if num_engines < 1:
        raise ConfigError.out_of_range("num_inference_engines", num_engines, "an integer >= 1")
    bundle: dict[str, float] = {"CPU": num_cpus_per_engine}
    if num_gpus_per_engine:
        bundle["GPU"] = num_gpus_per_engine
    group = placement_group([dict(bundle) for _ in range(num_engines)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise EngineDeadError(f"placement group of {num_engines} bundle(s) {bundle} was not scheduled within "
                              f"{timeout_s}s; the cluster has {ray.cluster_resources()}.")
    return group


def create_ray_engines(num_engines: int, backend: str, model: str | os.PathLike[str] | None = None, *,
                       num_gpus_per_engine: float = 0.0, num_cpus_per_engine: float = 1.0,
                       placement_group: PlacementGroup | None = None, bundle_indices: Sequence[int] | None = None,
                       colocate: bool = False, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                       actor_options: dict[str, Any] | None = None, placement_strategy: str = "PACK",
                       **engine_options: Any) -> list[RayEngineProxy]:
    """Start ``num_engines`` engine actors and return their proxies (ready to use).

    * Own GPUs (default): a new placement group with one bundle of ``num_gpus_per_engine`` GPUs and
      ``num_cpus_per_engine`` CPUs per engine.
    * Colocated with training (``colocate=True``): pass the trainer's ``placement_group``; engine
      ``i`` is scheduled on bundle ``bundle_indices[i]`` (default ``i``) with a fractional
      ``num_gpus_per_engine`` (for example 0.2), leaving the rest of the GPU to the training actor.

    ``placement_strategy`` is the new placement group's (Ray's ``PACK``, ``SPREAD``, ``STRICT_SPREAD``:
    one engine per node, ``STRICT_PACK``). ``engine_options`` are ``create_engine`` keywords (a
    generator config's fields).
    """
    if colocate and placement_group is None:
        raise ConfigError("placement_group", "colocate=True needs the trainer's placement group to share.")
    if colocate and not 0 < num_gpus_per_engine < 1 and num_gpus_per_engine != 0:
        raise ConfigError.out_of_range("num_gpus_per_engine", num_gpus_per_engine,
                                       "a fraction in (0, 1) when colocated with training (or 0 on CPU)")
    own_group = placement_group is None
    group = placement_group or engine_placement_group(num_engines, num_gpus_per_engine, num_cpus_per_engine,
                                                      strategy=placement_strategy, timeout_s=start_timeout_s)
    indices = list(bundle_indices) if bundle_indices is not None else list(range(num_engines))
    if len(indices) != num_engines:
        raise ConfigError("bundle_indices", f"has {len(indices)} entries for {num_engines} engines.")
    actor_class = ray.remote(RayWrappedInferenceEngine)
    model_path = os.fspath(model) if model is not None else None
    spawn = {"backend": backend, "model": model_path, "engine_options": dict(engine_options),
             "num_cpus": num_cpus_per_engine, "num_gpus": num_gpus_per_engine,
             "actor_options": dict(actor_options or {})}
    actors = []
    for index in indices:
        options = {"num_cpus": num_cpus_per_engine, "num_gpus": num_gpus_per_engine, "max_restarts": 0,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       placement_group=group, placement_group_bundle_index=index),
                   **(actor_options or {})}
        actors.append(actor_class.options(**options).remote(backend, model_path, dict(engine_options)))
    try:
        proxies = [RayEngineProxy.from_actor(actor, f"ray-engine-{i}", start_timeout_s, spawn)
                   for i, actor in enumerate(actors)]
        lease = PlacementLease(group, len(proxies)) if own_group else None
        for proxy, index in zip(proxies, indices, strict=True):
            proxy.placement = (group, index)
            proxy.lease = lease
        return proxies
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if own_group:
            ray.util.remove_placement_group(group)
        raise


def _lost_by_the_system(exc: BaseException) -> bool:
    """Whether an actor failed to start because of the system (its node or process died) rather
    than its engine's own start-up raising, which would only fail again."""
    cause = exc.__cause__ if isinstance(exc, EngineDeadError) else exc
    return isinstance(cause, ray.exceptions.ActorDiedError) and not cause.actor_init_failed


def _until_marked_dead(node_id: str, deadline: float) -> bool:
    """Wait until Ray marks ``node_id`` dead (True), or until ``deadline`` (False)."""
    while any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()):
        if time.monotonic() + _NODE_DEATH_POLL_S >= deadline:
            return False
        time.sleep(_NODE_DEATH_POLL_S)
    return True


def restart_ray_engine(lost: RayEngineProxy, *, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                       name: str | None = None) -> RayEngineProxy:
    """A new actor for an engine that was lost (its node died, its process crashed): the same
    backend, model, engine options and resources, on a live node. An engine of a placement group goes
    back to its bundle, which Ray moves to a live node with room when the bundle's node died (the
    group's strategy still holds: STRICT_SPREAD keeps engines on distinct nodes); other engines get a
    one-bundle group of their own. The new engine has the model's initial weights: push the current
    ones before it serves (``EngineRecovery`` does, in its ``restore`` step)."""
    if lost.spawn is None:
        raise ConfigError("lost", f"{lost.name} was not started by create_ray_engines, so how to start it again is "
                                  f"unknown; create a new engine and add it to the pool instead")
    spawn = lost.spawn
    with contextlib.suppress(Exception):  # a dead actor: make sure Ray does not bring it back as well
        ray.kill(lost.actor, no_restart=True)
    lease = lost.lease
    if lost.placement is not None:
        group, index = lost.placement
    else:
        group, index = engine_placement_group(1, spawn["num_gpus"], spawn["num_cpus"], timeout_s=start_timeout_s), 0
        lease = PlacementLease(group, 1)
    options = {"num_cpus": spawn["num_cpus"], "num_gpus": spawn["num_gpus"], "max_restarts": 0,
               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=group,
                                                                        placement_group_bundle_index=index),
               **spawn["actor_options"]}
    deadline = time.monotonic() + start_timeout_s
    retried = False
    while True:
        actor = ray.remote(RayWrappedInferenceEngine).options(**options).remote(
            spawn["backend"], spawn["model"], dict(spawn["engine_options"]))
        try:
            proxy = RayEngineProxy.from_actor(actor, name or lost.name, max(1.0, deadline - time.monotonic()), spawn)
            break
        except BaseException as exc:
            ray.kill(actor, no_restart=True)
            # Right after a node dies, Ray still counts it alive (until it misses enough health
            # checks) and schedules the new actor into the bundle there, where it dies unstarted.
            # Once Ray has marked the node dead it moves the bundle to a live node: try once more then.
            # Ray fails such an actor once it has marked the node dead, so the lost engine's node is
            # dead by now (or within moments); if it is alive, the failure was something else.
            if (not retried and lost.node_id is not None and _lost_by_the_system(exc)
                    and _until_marked_dead(lost.node_id, min(deadline, time.monotonic() + _NODE_DEATH_WAIT_S))):
                logger.warning("restarting %s: the new actor was lost with the dead node %s before it "
                               "started; starting it again", name or lost.name, lost.node_id)
                retried = True
                continue
            if lease is not None and lease is not lost.lease:
                lease.release()
            raise
    proxy.placement = (group, index)
    proxy.lease = lease
    if lease is lost.lease:
        lost.lease = None  # the lost engine's teardown must not release the group its successor uses
    return proxy
