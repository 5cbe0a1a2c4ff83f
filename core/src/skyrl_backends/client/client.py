"""InferenceEngineClient: one async API over many engines.

The trainer talks to this object as it would to one :class:`~skyrl_backends.engine.InferenceEngine`
(the same ``generate``, ``sleep``, ``wake_up``, weight and LoRA calls), and the client:

* splits a batch across engines and returns completions in the caller's order;
* routes every prompt with a session id to the engine the consistent-hash ring gives that session,
  and balances the rest by the number of sequences in flight;
* pauses generation for in-flight weight updates in the three pause modes (``abort``, ``wait``,
  ``keep``) on every engine: ``keep`` natively where the engine keeps requests and labels their
  tokens with weight versions, otherwise by aborting and resubmitting each sequence as a
  continuation (see :mod:`skyrl_backends.client.continuation` and
  :mod:`skyrl_backends.client.pausing`), otherwise by draining; ``max_staleness`` bounds how many
  versions one segment of a request may span;
* fails over: an engine that raises an engine failure (dead Ray actor, torn-down engine, timeout)
  is marked unhealthy and its pending prompts are sent to the others (sessions move to the ring's
  next engine), or fail with :class:`~skyrl_backends.errors.EngineDeadError` when none is left.

Engines are anything implementing :class:`skyrl_backends.protocols.Engine`: in-process
``InferenceEngine`` objects and Ray actor proxies (:mod:`skyrl_backends.ray_wrapper`) alike. The
client implements the protocol too, so a pool stands wherever one engine would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.client.continuation import Continuation, Decode
from skyrl_backends.client.hashing import DEFAULT_VIRTUAL_NODES, ConsistentHashRing
from skyrl_backends.client.pausing import (
    KeepStrategy,
    PauseKind,
    check_keep_strategy,
    check_max_staleness,
    pause_kind,
    stale_segments,
)
from skyrl_backends.client.routing import LoadTracker, Router, SessionRouting, reassemble
from skyrl_backends.client.streaming import merge_streams
from skyrl_backends.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineStateError,
    UnsupportedCapabilityError,
)
from skyrl_backends.protocols import Engine, Prompts, SamplingInput
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import StopStringMatcher
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
    check_pause_mode,
)

logger = logging.getLogger(__name__)

_ABORT_CALL_TIMEOUT_S = 10.0


def is_engine_failure(exc: BaseException) -> bool:
    """Errors that say the engine is gone or unresponsive (fail over), as opposed to errors about
    the request itself (bad parameters: raised to the caller, the engine stays healthy)."""
    return isinstance(exc, (EngineDeadError, EngineClosedError, TimeoutError, ConnectionError))


@dataclass
class EngineStats:
    """What the client has seen of one engine (for health reports and benchmarks)."""

    sequences_submitted: int = 0
    sequences_completed: int = 0
    continuations: int = 0  # resubmissions of sequences that a pause or a teardown cut short
    failovers: int = 0


@dataclass
class _EngineSlot:
    engine_id: str
    engine: Engine
    healthy: bool = True
    failure: str | None = None
    stats: EngineStats = field(default_factory=EngineStats)
    # engine-level request id -> client request id, for the segments running there now
    inflight: dict[str, str] = field(default_factory=dict)
    # engine-level request id -> the engine's weight version when that segment was submitted
    started_at: dict[str, int] = field(default_factory=dict)

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities


@dataclass
class _Segment:
    """One engine call of part of a batch, and the client state it started under.

    ``client_ids[i]`` is the caller's request id of prompt ``i`` (continuation pieces carry their
    own engine-level ids, so the two differ)."""

    slot: _EngineSlot
    request: GenerateRequest
    client_ids: list[str]
    abort_epoch: int
    fallback_pauses: int = 0


class InferenceEngineClient:
    """Routes requests over several engines; see the module docstring.

    ``request_timeout`` bounds each engine call in seconds (None: unbounded); an engine that
    exceeds it is marked unhealthy and its prompts fail over. ``tokenizer`` (anything with
    ``decode(ids, skip_special_tokens=True)``) or ``decode`` lets continuations re-check stop strings
    across the seam and decode their text whole. ``keep_strategy="continue"`` keeps requests across
    a ``keep`` pause by abort-and-continue even on engines that could keep them natively.
    ``max_staleness`` (None: no bound) is how many weight updates one segment of a request may be
    kept across before it is cut and continued under the new weights (0: every update cuts every
    request in flight). ``session_load_factor`` (None: strictly sticky) lets a session leave an
    engine that has more than that factor times the average load in flight (consistent hashing with
    bounded loads; see ``routing.Router``).
    """

    def __init__(self, engines: Sequence[Engine], *, request_timeout: float | None = None,
                 session_routing: SessionRouting = "consistent_hash", keep_strategy: KeepStrategy = "auto",
                 max_staleness: int | None = None, tokenizer: Any = None, decode: Decode | None = None,
                 virtual_nodes: int = DEFAULT_VIRTUAL_NODES, max_failovers: int | None = None,
                 session_load_factor: float | None = None) -> None:
        check_keep_strategy(keep_strategy)
        check_max_staleness(max_staleness)
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout!r}")
        self.request_timeout = request_timeout
        self.keep_strategy = keep_strategy
        self.max_staleness = max_staleness
        if decode is None and tokenizer is not None:
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self._decode = decode
        self._slots: dict[str, _EngineSlot] = {}
        self._ids = itertools.count()
        self._ring = ConsistentHashRing(virtual_nodes=virtual_nodes)
        self._load = LoadTracker()
        self._router = Router(self._ring, self._load, session_routing, session_load_factor=session_load_factor)
        self._max_failovers = max_failovers
        self._closed = False
        # Pause state. New requests and continuations wait while paused (and while an update cuts
        # stale segments); ``_state_changed`` is set (and replaced) whenever pause or abort state
        # changes, waking every waiter. ``_paused_as`` says how each engine was paused.
        self._paused = False
        self._pause: tuple[str, bool] | None = None
        self._paused_as: dict[str, PauseKind] = {}
        self._holding_for_update = 0
        self._stale_cut: set[str] = set()  # engine request ids cut by max_staleness, to be continued
        self._fallback_pauses = 0
        self._state_changed = asyncio.Event()
        self._abort_epoch = 0
        self._user_aborted: set[str] = set()
        self.weight_version = 0
        self._lora_versions: dict[str, int] = {}
        for engine in engines:
            self.add_engine(engine)
        if not self._slots:
            raise ValueError("InferenceEngineClient needs at least one engine")

    # -- the pool ----------------------------------------------------------------------------
    def add_engine(self, engine: Engine, engine_id: str | None = None) -> str:
        """Add an engine to the pool; returns its id. Only the sessions the ring now gives the new
        engine move to it."""
        engine_id = engine_id or f"engine-{next(self._ids)}"
        if engine_id in self._slots:
            raise ValueError(f"an engine with id {engine_id!r} is already in the pool")
        self._slots[engine_id] = _EngineSlot(engine_id, engine)
        self._ring.add(engine_id)
        return engine_id

    def remove_engine(self, engine_id: str) -> Engine:
        """Take an engine out of the pool (it is not torn down); returns it. Requests running
        there finish there."""
        slot = self._slot(engine_id)
        self._ring.remove(engine_id)
        del self._slots[engine_id]
        return slot.engine

    def replace_engine(self, engine_id: str, engine: Engine) -> Engine:
        """Put ``engine`` in the place of the pool's engine ``engine_id`` (a restarted one, say) and
        mark it healthy: it keeps the id, so the sessions the ring gives that id return to it. Returns
        the engine it replaces (not torn down). Give it the current weights first."""
        slot = self._slot(engine_id)
        old, slot.engine = slot.engine, engine
        slot.healthy, slot.failure = True, None
        slot.inflight.clear()  # requests of the old engine failed over or finished
        return old

    @property
    def engine_ids(self) -> list[str]:
        return list(self._slots)

    @property
    def engines(self) -> list[Engine]:
        return [s.engine for s in self._slots.values()]

    def engine(self, engine_id: str) -> Engine:
        return self._slot(engine_id).engine

    # -- what the pool is, as one engine ------------------------------------------------------
    @property
    def backend(self) -> str:
        """The pool's backend name (names joined by ``+`` when the pool mixes backends)."""
        return "+".join(dict.fromkeys(s.engine.backend for s in self._slots.values()))

    @property
    def capabilities(self) -> Capabilities:
        """What every healthy engine of the pool supports."""
        return Capabilities.common([s.capabilities for s in (self._usable() or self._slots.values())])

    @property
    def closed(self) -> bool:
        return self._closed

    def parallel_sizes(self) -> ParallelSizes:
        """One engine's parallel sizes (the pool's engines are meant to be identical)."""
        return next(iter(self._slots.values())).engine.parallel_sizes()

    def engine_version(self) -> str | None:
        versions = {s.engine.engine_version() for s in self._slots.values()}
        return versions.pop() if len(versions) == 1 else None

    async def weight_specs(self) -> dict[str, TensorSpec]:
        """The parameters of the pool's first healthy engine."""
        return await self._require_usable()[0].engine.weight_specs()

    def route_session(self, session_id: str) -> str | None:
        """The engine id that serves ``session_id`` now (None when no engine is healthy)."""
        return self._router.engine_for_session(session_id, self._usable_ids())

    def health(self) -> dict[str, dict[str, Any]]:
        return {s.engine_id: {"healthy": s.healthy, "failure": s.failure, "inflight": len(s.inflight),
                              **vars(s.stats)} for s in self._slots.values()}

    def mark_unhealthy(self, engine_id: str, reason: str) -> None:
        slot = self._slot(engine_id)
        if slot.healthy:
            logger.warning("engine %s marked unhealthy: %s", engine_id, reason)
        slot.healthy, slot.failure = False, reason

    def mark_healthy(self, engine_id: str) -> None:
        """Put a recovered engine back into rotation (its sessions return to it). Its weights may
        be stale: push weights before relying on it."""
        slot = self._slot(engine_id)
        slot.healthy, slot.failure = True, None

    @property
    def paused(self) -> bool:
        return self._paused

    def _slot(self, engine_id: str) -> _EngineSlot:
        try:
            return self._slots[engine_id]
        except KeyError:
            raise KeyError(f"no engine {engine_id!r} in the pool; engines: {', '.join(self._slots)}") from None

    def _usable_ids(self) -> list[str]:
        return [s.engine_id for s in self._slots.values() if s.healthy]

    def _usable(self) -> list[_EngineSlot]:
        return [s for s in self._slots.values() if s.healthy]

    def _require_usable(self) -> list[_EngineSlot]:
        slots = self._usable()
        if not slots:
            reasons = "; ".join(f"{s.engine_id}: {s.failure}" for s in self._slots.values())
            raise EngineDeadError(f"no healthy engine is left in the pool ({reasons}).")
        return slots

    # -- generation --------------------------------------------------------------------------
    async def generate(self, request: Prompts, sampling_params: SamplingInput = None,
                       **request_fields: Any) -> GenerateOutput:
        """Generate for a batch over the pool; completions come back in the batch's order
        (``n`` per prompt, prompt-major). Same arguments as ``InferenceEngine.generate``."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        self._check_open()
        epoch = self._abort_epoch
        try:
            completions = await self._generate_routed(request, list(request.request_ids), epoch, attempts=0)
        finally:
            self._user_aborted.difference_update(request.request_ids)
        return GenerateOutput(completions)

    async def _generate_routed(self, request: GenerateRequest, client_ids: list[str], epoch: int,
                               attempts: int) -> list[Completion]:
        """Route ``request`` over the usable engines and run every part; a part whose engine fails
        is routed again over the engines left."""
        await self._wait_while_paused(client_ids, epoch)
        self._require_usable()
        n = request.sampling_params.n
        assignment = self._router.assign(request.session_ids, len(request), self._usable_ids(), weight=n)
        if len(assignment) == 1:  # the common case of one prompt: no copy of the request
            engine_id = next(iter(assignment))
            parts = [(list(range(len(request))), self._slots[engine_id], request, client_ids)]
        else:
            parts = [(indices, self._slots[engine_id], request.subset(indices), [client_ids[i] for i in indices])
                     for engine_id, indices in assignment.items()]
        results = await _gather_or_cancel(
            [self._run_part(slot, sub, ids, epoch, attempts) for _, slot, sub, ids in parts])
        return reassemble(len(request), n, [(part[0], out) for part, out in zip(parts, results)])

    async def _run_part(self, slot: _EngineSlot, request: GenerateRequest, client_ids: list[str], epoch: int,
                        attempts: int) -> list[Completion]:
        try:
            segment, output = await self._call_generate(slot, request, client_ids, epoch)
        except Exception as exc:
            if not self._is_failure_of(slot, exc):
                raise
            return await self._fail_over(slot, request, client_ids, epoch, attempts, exc)
        completions = list(output.completions)
        n = request.sampling_params.n
        pending = [i for i, c in enumerate(completions) if self._should_continue(segment, c, client_ids[i // n])]
        if pending:
            continued = await self._continue_together(
                segment, [(i // n, i % n, completions[i]) for i in pending], epoch, attempts)
            for i, completion in zip(pending, continued):
                completions[i] = completion
        return completions

    async def _fail_over(self, slot: _EngineSlot, request: GenerateRequest, client_ids: list[str], epoch: int,
                         attempts: int, exc: BaseException) -> list[Completion]:
        self.mark_unhealthy(slot.engine_id, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        limit = self._max_failovers if self._max_failovers is not None else len(self._slots)
        if attempts >= limit or not self._usable():
            why = "no healthy engine is left" if not self._usable() else f"{attempts} failover(s) were already tried"
            raise EngineDeadError(
                f"engine {slot.engine_id} failed ({slot.failure}) with {len(request)} prompt(s) pending and "
                f"{why}.") from exc
        slot.stats.failovers += 1
        logger.warning("failing over %d prompt(s) from %s", len(request), slot.engine_id)
        return await self._generate_routed(request, client_ids, epoch, attempts + 1)

    def _should_continue(self, segment: _Segment, completion: Completion, client_rid: str) -> bool:
        """An aborted sequence is resubmitted when the client's pause or its staleness bound (not
        the caller) aborted it, or when its engine was torn down under it."""
        if completion.finish_reason != "abort":
            return False
        cut_for_staleness = completion.request_id in self._stale_cut
        self._stale_cut.discard(completion.request_id or "")
        if self._is_user_aborted(client_rid, segment.abort_epoch):
            return False
        if cut_for_staleness or self._fallback_pauses != segment.fallback_pauses:
            return True
        return bool(getattr(segment.slot.engine, "closed", False))

    async def _continue_together(self, first: _Segment, cut: list[tuple[int, int, Completion]], epoch: int,
                                 attempts: int) -> list[Completion]:
        """Resubmit the sequences of one engine call that a pause or a teardown cut short (``cut``:
        prompt index, sample and partial completion of each), each from where it stopped (see
        continuation.py), and return them completed. Sequences whose continuations share their
        parameters go in one call (a batch cut together, as a teardown cuts it, continues as a batch,
        as fast as it ran); the call runs like any part of a batch, so it is routed, failed over and
        continued again in turn. It stays on the same engine while that engine is healthy."""
        request = first.request
        if getattr(first.slot.engine, "closed", False) and first.slot.healthy:
            self.mark_unhealthy(first.slot.engine_id, "engine was torn down")
        states: list[tuple[Continuation, int]] = []
        groups: list[tuple[SamplingParams, list[int]]] = []  # next parameters, indices into states
        for prompt_index, sample, completion in cut:
            params = request.sampling_params.replace(n=1)
            if request.sampling_params.n > 1 and params.seed is not None:
                params = params.replace(seed=params.seed + sample)  # the facade's seed for sample j
            state = Continuation(prompt=list(request.prompt_token_ids[prompt_index]), params=params,
                                 request_id=completion.request_id or f"{first.client_ids[prompt_index]}-{sample}")
            state.absorb(completion)
            states.append((state, prompt_index))
            if state.needs_more:
                following = state.next_params()
                group = next((members for key, members in groups if key == following), None)
                if group is None:
                    groups.append((following, group := []))
                group.append(len(states) - 1)

        async def resubmit(params: SamplingParams, members: list[int]) -> list[Completion]:
            sub = GenerateRequest(
                prompt_token_ids=[states[k][0].next_prompt() for k in members], sampling_params=params,
                request_ids=[f"{states[k][0].request_id}~{len(states[k][0].texts)}" for k in members],
                session_ids=[request.session_ids[states[k][1]] for k in members] if request.session_ids else None,
                lora_name=request.lora_name)
            client_ids = [first.client_ids[states[k][1]] for k in members]
            first.slot.stats.continuations += len(members)
            if first.slot.healthy:
                return await self._run_part(first.slot, sub, client_ids, epoch, attempts)
            return await self._generate_routed(sub, client_ids, epoch, attempts)

        results = await _gather_or_cancel([resubmit(params, members) for params, members in groups])
        for (_, members), outputs in zip(groups, results):
            for k, completion in zip(members, outputs):
                states[k][0].absorb(completion)
        return [state.result(self._decode) for state, _ in states]

    @staticmethod
    def _is_failure_of(slot: _EngineSlot, exc: BaseException) -> bool:
        """An engine failure, or any error from an engine that has since been torn down (its
        executor refusing work, say): both mean "try elsewhere", not "bad request"."""
        return is_engine_failure(exc) or bool(getattr(slot.engine, "closed", False))

    def _pick_engine(self, session_id: str | None) -> _EngineSlot:
        self._require_usable()
        assignment = self._router.assign([session_id], 1, self._usable_ids())
        return self._slots[next(iter(assignment))]

    async def _call_generate(self, slot: _EngineSlot, request: GenerateRequest, client_ids: list[str],
                             epoch: int) -> tuple[_Segment, GenerateOutput]:
        """One engine call, with pause, load and in-flight bookkeeping, the timeout, and abort of
        the engine's requests when the caller cancels or the call times out."""
        await self._wait_while_paused(client_ids, epoch)
        if all(self._is_user_aborted(rid, epoch) for rid in client_ids):
            segment = _Segment(slot, request, client_ids, epoch, self._fallback_pauses)
            return segment, GenerateOutput(_empty_aborted(request, _version_of(slot.engine)))
        # From here to the engine call nothing awaits, so a pause either came before (and we waited)
        # or sees these ids in ``slot.inflight`` and aborts them.
        segment = _Segment(slot, request, client_ids, epoch, self._fallback_pauses)
        n = request.sampling_params.n
        engine_ids = _engine_request_ids(request)
        version = _version_of(slot.engine)
        for k, engine_rid in enumerate(engine_ids):
            slot.inflight[engine_rid] = client_ids[k // n]
            slot.started_at[engine_rid] = version
        self._load.add(slot.engine_id, len(engine_ids))
        slot.stats.sequences_submitted += len(engine_ids)
        try:
            call = slot.engine.generate(request)
            if self.request_timeout is None:
                output = await call
            else:
                try:
                    output = await asyncio.wait_for(call, self.request_timeout)
                except TimeoutError:
                    self._abort_in_background(slot, engine_ids)
                    raise TimeoutError(f"engine {slot.engine_id} did not answer within "
                                       f"{self.request_timeout}s (request_timeout)") from None
        except asyncio.CancelledError:
            self._abort_in_background(slot, engine_ids)
            raise
        finally:
            for engine_rid in engine_ids:
                slot.inflight.pop(engine_rid, None)
                slot.started_at.pop(engine_rid, None)
            self._load.done(slot.engine_id, len(engine_ids))
        if not isinstance(output, GenerateOutput) or len(output) != len(engine_ids):
            got = len(output) if isinstance(output, GenerateOutput) else type(output).__name__
            raise EngineStateError(f"engine {slot.engine_id} returned {got} completions for "
                                   f"{len(request)} prompt(s) x {n} sample(s)")
        slot.stats.sequences_completed += len(output)
        return segment, output

    # -- streaming ---------------------------------------------------------------------------
    async def generate_stream(self, request: Prompts, sampling_params: SamplingInput = None,
                              **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """Completions as their tokens arrive; ``chunk.index`` is the completion's position in what
        :meth:`generate` returns for the same request (prompt-major, ``n`` per prompt). Each prompt
        streams from the engine its session (sticky) or the load picks.

        A ``keep`` pause by abort (engines that cannot keep requests, or ``keep_strategy="continue"``) is seamless:
        the aborted segment's tokens have been relayed, the sequence waits for resume and goes on as
        a continuation on the same stream, whose last chunk carries the assembled completion
        (``max_generate_length`` tokens unless a stop condition ends it earlier). Unlike
        :meth:`generate`, a stream does not fail over and has no ``request_timeout``: an engine
        failure mid-stream marks the engine unhealthy and is raised."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        self._check_open()
        n = request.sampling_params.n
        streams = [self._stream_prompt(request.subset([i])) for i in range(len(request))]
        async for number, chunk in merge_streams(streams):
            chunk.index = number * n + chunk.index
            yield chunk

    async def _stream_prompt(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """One prompt's ``n`` completions (``chunk.index`` is the sample)."""
        epoch = self._abort_epoch
        client_rid = request.request_ids[0]
        try:
            first: _Segment | None = None
            to_continue: list[tuple[int, Completion]] = []
            async for first, chunk in self._stream_call(None, request, client_rid, epoch):
                if chunk.completion is not None and self._should_continue(first, chunk.completion, client_rid):
                    to_continue.append((chunk.index, chunk.completion))
                    chunk = StreamChunk(chunk.index, chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                        token_versions=chunk.token_versions)
                yield chunk
            if to_continue and first is not None:
                sequels = [self._stream_sequel(first, sample, completion, epoch) for sample, completion in to_continue]
                async for _, chunk in merge_streams(sequels):
                    yield chunk
        finally:
            self._user_aborted.discard(client_rid)

    async def _stream_call(self, slot: _EngineSlot | None, request: GenerateRequest, client_rid: str,
                           epoch: int) -> AsyncIterator[tuple[_Segment, StreamChunk]]:
        """One streamed engine call (after any pause), with the load and in-flight bookkeeping of
        :meth:`_call_generate`; chunks come with the segment they belong to."""
        await self._wait_while_paused([client_rid], epoch)
        session_id = request.session_ids[0] if request.session_ids else None
        if slot is not None and slot.healthy and getattr(slot.engine, "closed", False):
            self.mark_unhealthy(slot.engine_id, "engine was torn down")  # it cut the stream this continues
        if slot is None or not slot.healthy:
            slot = self._pick_engine(session_id)
        segment = _Segment(slot, request, [client_rid], epoch, self._fallback_pauses)
        if self._is_user_aborted(client_rid, epoch):
            for index, completion in enumerate(_empty_aborted(request, _version_of(slot.engine))):
                yield segment, StreamChunk.final(index, completion)
            return
        engine_ids = _engine_request_ids(request)
        version = _version_of(slot.engine)
        for engine_rid in engine_ids:
            slot.inflight[engine_rid] = client_rid
            slot.started_at[engine_rid] = version
        self._load.add(slot.engine_id, len(engine_ids))
        slot.stats.sequences_submitted += len(engine_ids)
        finished = 0
        stream = slot.engine.generate_stream(request)
        try:
            async for chunk in stream:
                if chunk.completion is not None:
                    finished += 1
                    slot.stats.sequences_completed += 1
                    slot.inflight.pop(engine_ids[chunk.index], None)
                    slot.started_at.pop(engine_ids[chunk.index], None)
                yield segment, chunk
        except Exception as exc:
            if self._is_failure_of(slot, exc):
                self.mark_unhealthy(slot.engine_id, f"{type(exc).__name__}: {exc}")
                raise EngineDeadError(f"engine {slot.engine_id} failed mid-stream: {exc!r}") from exc
            raise
        finally:
            if finished < len(engine_ids):  # the caller left early: end the engine's requests
                self._abort_in_background(slot, [r for r in engine_ids if r in slot.inflight])
            for engine_rid in engine_ids:
                slot.inflight.pop(engine_rid, None)
                slot.started_at.pop(engine_rid, None)
            self._load.done(slot.engine_id, len(engine_ids))

    async def _stream_sequel(self, first: _Segment, sample: int, completion: Completion,
                             epoch: int) -> AsyncIterator[StreamChunk]:
        """The rest of one sequence a pause aborted, streamed as continuations (see
        :meth:`_continue`); ``completion`` (already relayed) is its first segment. With a decoder,
        a stop string that spans a seam ends the stream at the token completing it, so no token
        relayed is ever taken back."""
        request = first.request
        client_rid = first.client_ids[0]
        params = request.sampling_params.replace(n=1)
        if request.sampling_params.n > 1 and params.seed is not None:
            params = params.replace(seed=params.seed + sample)
        state = Continuation(prompt=list(request.prompt_token_ids[0]), params=params,
                             request_id=completion.request_id)
        state.absorb(completion)
        matcher = StopStringMatcher(params.stop, self._decode) if self._decode is not None else None
        if matcher:
            matcher.feed(state.token_ids)  # no match before the first seam: the engine would have stopped
        relayed = len(state.token_ids)
        piece_base = completion.request_id or f"{client_rid}-{sample}"
        slot: _EngineSlot | None = first.slot
        for piece in itertools.count(1):
            if not state.needs_more:
                break
            sub = GenerateRequest(prompt_token_ids=[state.next_prompt()], sampling_params=state.next_params(),
                                  request_ids=[f"{piece_base}~{piece}"], session_ids=request.session_ids,
                                  lora_name=request.lora_name)
            segment: _Segment | None = None
            tokens: list[int] = []
            logprobs: list[float] = []
            top: list[dict[int, float]] = []
            versions: TokenVersions | None = TokenVersions((), 0)
            matched = False
            stream = self._stream_call(slot, sub, client_rid, epoch)
            async for segment, chunk in stream:
                slot = segment.slot
                if chunk.completion is not None and not chunk.token_ids:
                    piece_completion = chunk.completion
                    break
                keep = len(chunk.token_ids)
                if matcher:
                    for k, token in enumerate(chunk.token_ids):
                        if matcher.feed(state.token_ids + tokens + chunk.token_ids[: k + 1]) is not None:
                            keep, matched = k + 1, True
                            break
                part = StreamChunk(sample, chunk.token_ids[:keep],
                                   chunk.logprobs[:keep] if chunk.logprobs is not None else None,
                                   chunk.top_logprobs[:keep] if chunk.top_logprobs is not None else None,
                                   token_versions=chunk.token_versions.slice(0, keep)
                                   if chunk.token_versions is not None else None)
                versions = _concat_versions(versions, part.token_versions, len(part.token_ids))
                tokens += part.token_ids
                logprobs += part.logprobs or []
                top += part.top_logprobs or []
                relayed += len(part.token_ids)
                if part.token_ids:
                    yield part
                if matched or chunk.completion is not None:
                    piece_completion = chunk.completion
                    break
            else:
                piece_completion = None
            await stream.aclose()
            if matched or piece_completion is None:
                # Cut by a stop string across the seam (the engine's request is aborted on close):
                # the result's own seam check ends the sequence at the same token.
                piece_completion = Completion(
                    token_ids=tokens, finish_reason="abort",
                    logprobs=logprobs if params.logprobs is not None else None,
                    top_logprobs=top if params.logprobs else None, request_id=sub.request_ids[0],
                    token_versions=versions)
            assert segment is not None
            segment.slot.stats.continuations += 1
            state.absorb(piece_completion)
            if matched or (state.finish_reason == "abort"
                           and not self._should_continue(segment, piece_completion, client_rid)):
                break
        yield StreamChunk.final(sample, state.result(self._decode), relayed)

    def _abort_in_background(self, slot: _EngineSlot, engine_ids: list[str]) -> None:
        if not slot.capabilities.abort:
            return

        async def abort() -> None:
            try:
                await asyncio.wait_for(slot.engine.abort(engine_ids), _ABORT_CALL_TIMEOUT_S)
            except Exception as exc:  # the engine may be the thing that is broken
                logger.debug("abort on %s failed: %r", slot.engine_id, exc)

        _spawn(abort())

    # -- pause, resume, abort ------------------------------------------------------------------
    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        """Pause every engine in ``mode``; new requests wait until :meth:`resume_generation`.

        * ``"keep"``: no in-flight request is lost. Engines that keep requests themselves (and
          label their tokens with weight versions) hold them; the others have them aborted and
          resubmitted as continuations on resume (a fresh prefill under the weights then current:
          ``recompute`` is what a continuation does anyway); engines that can do neither are drained.
        * ``"abort"``: every in-flight request ends now with what it generated, finish reason
          ``"abort"``, and is not continued.
        * ``"wait"``: in-flight requests run to their end before this returns.

        See :mod:`skyrl_backends.client.pausing`. Pausing again in the same mode does nothing."""
        check_pause_mode(mode, recompute)
        self._check_open()
        if self._pause is not None:
            if self._pause == (mode, recompute):
                return
            raise EngineStateError(f"the client is already paused in mode {self._pause[0]!r}; "
                                   "call resume_generation() before pausing in another mode.")
        self._paused, self._pause = True, (mode, recompute)
        if mode == "abort":
            self._abort_epoch += 1  # the requests in flight end with what they have
        self._notify()
        slots = self._usable()
        self._paused_as = {s.engine_id: pause_kind(s.capabilities, mode, recompute, self.keep_strategy)
                           for s in slots}
        continuing = [s for s in slots if self._paused_as[s.engine_id] == "continue"]
        if continuing:
            self._fallback_pauses += 1
        try:
            await _gather_or_cancel(
                [self._engine_call(s, s.engine.pause_generation, mode, recompute=recompute)
                 for s in slots if self._paused_as[s.engine_id] == "engine"]
                + [self._engine_call(s, s.engine.abort, list(s.inflight)) for s in continuing if s.inflight])
            # "wait" and "abort" return once the requests in flight have (each engine's facade
            # waits too; this covers any engine), a "keep" that cannot keep once they finished.
            draining = slots if mode != "keep" else [s for s in slots if self._paused_as[s.engine_id] == "drain"]
            if draining:
                await self._drain(draining)
        except BaseException:
            await self._undo_pause()
            raise

    async def resume_generation(self) -> None:
        """Resume every engine :meth:`pause_generation` paused; waiting requests and
        continuations go ahead."""
        self._check_open()
        if not self._paused:
            return
        await self._undo_pause()

    async def _undo_pause(self) -> None:
        paused = [s for s in self._usable() if self._paused_as.get(s.engine_id) == "engine"]
        try:
            await _gather_or_cancel([self._engine_call(s, s.engine.resume_generation) for s in paused])
        finally:
            self._paused, self._pause, self._paused_as = False, None, {}
            self._notify()

    async def abort(self, request_ids: Sequence[str] | None = None) -> None:
        """Abort requests (None: every request); their callers get what was generated so far with
        finish reason ``"abort"``, also while the client is paused."""
        if request_ids is None:
            self._abort_epoch += 1
        else:
            self._user_aborted.update(request_ids)
        self._notify()
        wanted = None if request_ids is None else set(request_ids)
        calls = []
        for slot in self._usable():
            ids = [rid for rid, client_rid in slot.inflight.items() if wanted is None or client_rid in wanted]
            if ids and slot.capabilities.abort:
                calls.append(self._engine_call(slot, slot.engine.abort, ids))
        await _gather_or_cancel(calls)

    def _is_user_aborted(self, client_rid: str, epoch: int) -> bool:
        return self._abort_epoch != epoch or client_rid in self._user_aborted

    async def _wait_while_paused(self, request_ids: Sequence[str], epoch: int) -> None:
        while (self._paused or self._holding_for_update) and not self._closed:
            if all(self._is_user_aborted(rid, epoch) for rid in request_ids):
                return
            await self._state_changed.wait()
        self._check_open()

    def _notify(self) -> None:
        event, self._state_changed = self._state_changed, asyncio.Event()
        event.set()

    async def _drain(self, slots: list[_EngineSlot], poll_s: float = 0.01) -> None:
        while any(s.inflight for s in slots):
            await asyncio.sleep(poll_s)

    # -- fan-out of the engine API -------------------------------------------------------------
    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        """Push a weight update to every healthy engine; returns the client's new weight version.

        Every engine validates the update before any applies it, so a bad update changes no engine.
        Safe between :meth:`pause_generation` and :meth:`resume_generation`, and while requests
        run. With ``max_staleness`` set, segments the update would take past the bound are cut
        first (their tokens so far kept) and continue once it has landed."""
        self._check_open()
        await self.validate_weight_update(request)
        slots = self._require_usable()
        cuts = {s.engine_id: stale_segments(s.started_at, _version_of(s.engine) + 1, self.max_staleness)
                for s in slots}
        cutting = [s for s in slots if cuts[s.engine_id]]
        if cutting:
            self._holding_for_update += 1  # the continuations wait for the new weights
        try:
            if cutting:
                for slot in cutting:
                    self._stale_cut.update(cuts[slot.engine_id])
                await _gather_or_cancel([self._engine_call(s, s.engine.abort, cuts[s.engine_id]) for s in cutting])
                await self._drain_ids({s.engine_id: cuts[s.engine_id] for s in cutting})
            await _gather_or_cancel([self._engine_call(s, s.engine.update_named_weights, request) for s in slots])
        finally:
            if cutting:
                self._holding_for_update -= 1
                self._notify()
        self.weight_version += 1
        return self.weight_version

    async def _drain_ids(self, ids_by_engine: dict[str, list[str]], poll_s: float = 0.005) -> None:
        """Wait until the named engine requests have returned (cut segments, before an update)."""
        while any(rid in self._slots[e].inflight for e, ids in ids_by_engine.items() if e in self._slots
                  for rid in ids):
            await asyncio.sleep(poll_s)

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        """Raise WeightUpdateError if any healthy engine would reject ``request``."""
        await _gather_or_cancel([s.engine.validate_weight_update(request) for s in self._require_usable()])

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int:
        return await self.update_named_weights(WeightUpdateRequest.from_named_tensors(list(named_tensors)))

    async def init_weight_update_communicator(
            self, init_info: WeightSyncInitInfo | Sequence[WeightSyncInitInfo]) -> None:
        """One ``WeightSyncInitInfo`` per engine (in pool order), or one shared by all."""
        slots = self._require_usable()
        infos = list(init_info) if isinstance(init_info, (list, tuple)) else [init_info] * len(slots)
        if len(infos) != len(slots):
            raise ValueError(f"got {len(infos)} init infos for {len(slots)} engines; give one per engine")
        await _gather_or_cancel([self._engine_call(s, s.engine.init_weight_update_communicator, info)
                                 for s, info in zip(slots, infos)])

    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        await self._fan_out("sleep", tags, level, abort_first=abort_first, drain_timeout=drain_timeout)

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        await self._fan_out("wake_up", tags)

    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str],
                                pinned: bool = False) -> None:
        await self._fan_out("load_lora_adapter", lora_name, lora_path, pinned)

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        """Raise if any healthy engine would refuse the adapter."""
        await _gather_or_cancel([s.engine.validate_lora_adapter_from_tensors(lora_name, lora_config, request)
                                 for s in self._require_usable()])

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        """Load (or replace) the adapter on every healthy engine, each having validated it first;
        returns the client's version of the adapter (bumped by every load under that name)."""
        self._check_open()
        await self.validate_lora_adapter_from_tensors(lora_name, lora_config, request)
        await self._fan_out("load_lora_adapter_from_tensors", lora_name, lora_config, request, pinned)
        self._lora_versions[lora_name] = self._lora_versions.get(lora_name, 0) + 1
        return self._lora_versions[lora_name]

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._fan_out("unload_lora_adapter", lora_name)

    async def reset_prefix_cache(self) -> None:
        """Reset the prefix cache of every engine that has one (engines without one have nothing
        to reset)."""
        self._check_open()
        slots = [s for s in self._require_usable() if s.capabilities.prefix_caching]
        await _gather_or_cancel([self._engine_call(s, s.engine.reset_prefix_cache) for s in slots])

    async def teardown(self) -> None:
        """Tear down every engine, healthy or not; errors from dead engines are logged."""
        if self._closed:
            return
        self._closed = True
        self._notify()
        results = await asyncio.gather(*(s.engine.teardown() for s in self._slots.values()),
                                       return_exceptions=True)
        for slot, result in zip(self._slots.values(), results):
            if isinstance(result, BaseException):
                logger.warning("teardown of %s failed: %r", slot.engine_id, result)

    async def __aenter__(self) -> InferenceEngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.teardown()

    async def _fan_out(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._check_open()
        slots = self._require_usable()
        unsupported = [s.engine_id for s in slots if not hasattr(s.engine, method)]
        if unsupported:
            raise UnsupportedCapabilityError(", ".join(unsupported), method)
        await _gather_or_cancel([self._engine_call(s, getattr(s.engine, method), *args, **kwargs) for s in slots])

    async def _engine_call(self, slot: _EngineSlot, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A control call (pause, weights, sleep...) with failure detection: an engine failure marks
        the engine unhealthy and is raised with the engine named."""
        try:
            result = fn(*args, **kwargs)
            if self.request_timeout is not None and asyncio.iscoroutine(result):
                return await asyncio.wait_for(result, self.request_timeout)
            return await _maybe_await(result)
        except Exception as exc:
            if is_engine_failure(exc):
                self.mark_unhealthy(slot.engine_id, f"{type(exc).__name__}: {exc}")
                raise EngineDeadError(f"engine {slot.engine_id} failed during "
                                      f"{getattr(fn, '__name__', 'a call')}: {exc!r}") from exc
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError()


def _engine_request_ids(request: GenerateRequest) -> list[str]:
    """The ids the engine sees: the facade names sample ``j`` of request ``r`` ``r-j`` when n > 1."""
    n = request.sampling_params.n
    if n == 1:
        return list(request.request_ids)
    return [f"{rid}-{j}" for rid in request.request_ids for j in range(n)]


def _empty_aborted(request: GenerateRequest, version: int = 0) -> list[Completion]:
    n = request.sampling_params.n
    return [Completion(token_ids=[], finish_reason="abort", request_id=rid, text="",
                       token_versions=TokenVersions.uniform(0, version))
            for rid in request.request_ids for _ in range(n)]


def _version_of(engine: Engine) -> int:
    """The weight version an engine serves now (0 for one that does not say)."""
    version = getattr(engine, "weight_version", 0)
    return version if isinstance(version, int) else 0


def _concat_versions(so_far: TokenVersions | None, more: TokenVersions | None, count: int) -> TokenVersions | None:
    """Versions of a piece's relayed tokens so far (None once any came without versions)."""
    if so_far is None or (more is None and count):
        return None
    return so_far.concat(more) if more is not None else so_far


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future) or hasattr(value, "__await__"):
        return await value
    return value


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)  # keep a reference until done, or the task may be collected mid-flight
    task.add_done_callback(_background.discard)


async def _gather_or_cancel(awaitables: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run concurrently; on the first error cancel the rest and raise that error (not a group)."""
    if not awaitables:
        return []
    if len(awaitables) == 1:
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
