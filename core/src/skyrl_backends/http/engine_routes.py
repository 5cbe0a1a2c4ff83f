"""The engine API over HTTP: every call of :class:`skyrl_backends.protocols.Engine`, as JSON, under
``/skyrl/v1`` (one engine) or ``/skyrl/v1/engines/<i>`` (each engine of a server that runs several).

What a trainer's :class:`~skyrl_backends.remote.RemoteEngine` talks to, and what ``skyrl-backends
serve`` mounts beside its OpenAI endpoint. The routes (``P`` is the prefix):

=========================================  ==========================================================
``GET  P/info``                            backend, engine version, capabilities, parallel sizes, state,
                                           the generator config (less keys and engine keyword arguments)
``GET  P/health``                          ``ok`` / ``asleep`` / ``weights_missing`` / ``paused`` / ``closed``
``GET  P/state``, ``GET P/capabilities``   the engine's state; what it declares
``GET  P/weights/version``, ``P/weights/specs``  weight version; every updatable parameter
``POST P/generate``                        token ids in, completions out (``"stream": true``: chunks)
``POST P/abort``, ``P/pause``, ``P/resume``  abort by request id (or all); pause (``mode``, ``recompute``)
``POST P/sleep``, ``P/wake_up``            by memory tag and level
``POST P/weights/init_communicator``       join the trainer's broadcast group (gloo or NCCL)
``POST P/weights/validate``, ``P/weights/update``  a weight update's manifest (broadcast, shared memory, CUDA IPC)
``POST P/lora/load``, ``P/lora/unload``    LoRA adapters (a path on the server's machine)
``POST P/lora/validate_from_tensors``,     LoRA adapters sent as tensors (``lora_name``, ``lora_config``,
``P/lora/load_from_tensors``               ``request``: a weight update's manifest, ``pinned``)
``POST P/reset_prefix_cache``
``POST P/host/probe``                      does the caller share this machine's shared memory
=========================================  ==========================================================

A POST body is a JSON object of the call's keyword arguments (``generate`` takes the request's
fields; weight updates their JSON manifest, :func:`skyrl_backends.weight_sync.manifest.request_to_json`).
Arguments pass to the engine by name, so a keyword an engine method gains travels without a change
here; an argument the engine does not take is a 400 naming it. Nothing is unpickled.

The answer depends on ``Accept``: ``application/json`` (default) waits for the outcome;
``application/x-ndjson`` or ``text/event-stream`` stream the operation's events (``accepted``,
``chunk`` s, heartbeats, then ``result`` or ``error``). Every POST is an operation of the
:class:`~skyrl_backends.http.engine_operations.OperationLog`: sent again with the same
``Idempotency-Key`` it is attached to, never run twice. Errors are the wire format's
(:mod:`skyrl_backends.remote.wire`), from which the caller rebuilds the engine's exception class.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from skyrl_backends.engine import sample_request_ids
from skyrl_backends.errors import ConfigError
from skyrl_backends.http import engine_info
from skyrl_backends.http.engine_operations import Operation, OperationLog
from skyrl_backends.http.guards import guard_app
from skyrl_backends.http.settings import HTTPSettings
from skyrl_backends.remote import same_host, wire
from skyrl_backends.weight_sync.layout_refs import INFO_FIELD as LAYOUTS_INFO_FIELD
from skyrl_backends.weight_sync.layout_refs import ReceivedLayouts
from skyrl_backends.weight_sync.manifest import request_from_json

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_API_MAX_BODY_BYTES = 64 * 1024 * 1024  # a rollout batch of token ids, or a weight manifest


# -- arguments ----------------------------------------------------------------------------------------
def _init_info_argument(value: Any) -> Any:
    if isinstance(value, list):
        return [wire.init_info_from_json(v) for v in value]
    return wire.init_info_from_json(value)


# Arguments that are not plain JSON values, by name: how each is rebuilt.
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "init_info": _init_info_argument,
    "request": request_from_json,  # weight updates; generate builds its request itself
}
_RESULTS: dict[str, Callable[[Any], Any]] = {
    "update_named_weights": int,
    "load_lora_adapter_from_tensors": int,
}


def _bind(method: Callable[..., Any], name: str, arguments: dict[str, Any],
          decoders: Mapping[str, Callable[[Any], Any]] = _DECODERS) -> dict[str, Any]:
    """``arguments`` checked against ``method``'s signature (an unknown or missing one is a 400 naming
    it) and decoded."""
    parameters = inspect.signature(method).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in arguments:
        if key not in parameters and not takes_any:
            accepted = [p for p in parameters if parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
            raise ConfigError(key, f"is not an argument of {name} on this server; it takes {accepted}")
    decoded = {key: (decoders[key](value) if key in decoders else value) for key, value in arguments.items()}
    try:
        inspect.signature(method).bind(**decoded)
    except TypeError as exc:
        raise ConfigError(name, f"bad arguments: {exc}") from None
    return decoded


# -- state ---------------------------------------------------------------------------------------------
async def engine_state(engine: Any) -> dict[str, Any]:
    """What the engine is doing (:func:`skyrl_backends.http.engine_info.engine_state`), with every key
    the wire's state carries."""
    raw = await engine_info.engine_state(engine)
    version = raw.get("weight_version")
    return {"weight_version": int(version if version is not None else getattr(engine, "weight_version", 0)),
            "asleep": sorted(raw.get("asleep", [])), "weights_loaded": bool(raw.get("weights_loaded", True)),
            "paused": bool(raw.get("paused", False)), "pause_mode": raw.get("pause_mode"),
            "closed": bool(getattr(engine, "closed", False) or raw.get("closed", False)),
            "lora_adapters": dict(raw.get("lora_adapters", {})), "lora_versions": dict(raw.get("lora_versions", {})),
            "inflight": int(getattr(engine, "num_inflight", raw.get("num_inflight", 0)) or 0)}


def health_status(state: dict[str, Any]) -> str:
    """The endpoint's health words (``/health``), for one engine: ``closed``, ``asleep``,
    ``weights_missing``, ``paused`` or ``ok``."""
    if state["closed"]:
        return "closed"
    if state["asleep"]:
        return "asleep"
    if not state["weights_loaded"]:
        return "weights_missing"
    if state["paused"]:
        return "paused"
    return "ok"


# -- responses ------------------------------------------------------------------------------------------
def _json(body: Any, status: int = 200) -> Response:
    return Response(wire.dumps(body), status_code=status, media_type="application/json")


def _error(exc: BaseException, status: int | None = None) -> Response:
    status = wire.status_of(exc) if status is None else status
    return _json(wire.error_to_json(exc, status), status)


def _wants(request: Request) -> str:
    accept = request.headers.get("accept", "")
    if wire.NDJSON in accept:
        return wire.NDJSON
    if wire.SSE in accept:
        return wire.SSE
    return "application/json"


class EngineRoutes:
    """The engine API of one engine, as request handlers (mounted by :func:`create_engine_app`)."""

    def __init__(self, engine: Any, log: OperationLog, index: int, count: int) -> None:
        self.engine = engine
        self.log = log
        self.index = index
        self.count = count
        # The weight-update layouts this engine was sent in full: later requests may name them by id.
        self.layouts = ReceivedLayouts()
        self._decoders = {**_DECODERS, "request": self.layouts.from_json}

    # -- reads ----------------------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        engine = self.engine
        config = getattr(engine, "config", None)
        return {"wire_version": wire.WIRE_VERSION, "dialect": wire.DIALECT, "backend": engine.backend,
                "engine_version": engine.engine_version(), "distribution": getattr(engine, "distribution", None),
                "model": getattr(config, "model", None), "capabilities": wire.capabilities_to_json(engine.capabilities),
                "parallel_sizes": _sizes(engine.parallel_sizes()), "config": wire.config_to_json(config),
                "engine_index": self.index, "num_engines": self.count, "state": await engine_state(engine),
                LAYOUTS_INFO_FIELD: self.layouts.kept}

    async def health(self) -> Response:
        state = await engine_state(self.engine)
        status = health_status(state)
        return _json({"status": status, "state": state}, 503 if status == "closed" else 200)

    async def weight_specs(self) -> dict[str, Any]:
        return {"specs": wire.specs_to_json(await self.engine.weight_specs())}

    # -- operations -----------------------------------------------------------------------------------
    async def post(self, request: Request, operation: str) -> Response:
        raw = await request.body()
        try:
            arguments = wire.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(ConfigError("body", f"is not valid JSON: {exc}"))
        if not isinstance(arguments, dict):
            return _error(ConfigError("body", f"must be a JSON object of the call's arguments, got "
                                              f"{type(arguments).__name__}"))
        try:
            run = self._generation(arguments) if operation == "generate" else self._call(operation, arguments)
        except Exception as exc:
            return _error(exc)
        key = request.headers.get(wire.IDEMPOTENCY_HEADER) or uuid.uuid4().hex
        fingerprint = hashlib.sha256(request.url.path.encode() + b"\0" + raw).hexdigest()
        try:
            start = int(request.headers.get(wire.RESUME_HEADER, "0"))
        except ValueError:
            return _error(ConfigError(wire.RESUME_HEADER, "must be an integer (events already received)"))
        attached = self.log.get(key) is not None
        try:
            op = self.log.get_or_start(key, fingerprint, run)
        except ConfigError as exc:  # the key was used for another call
            return _error(exc, 409)
        response = await self._respond(op, _wants(request), start)
        # A caller resuming a call this server does not know (it restarted) must not splice two runs.
        response.headers[wire.OPERATION_HEADER] = "attached" if attached else "new"
        return response

    def _call(self, operation: str, arguments: dict[str, Any]) -> Callable[[Operation], Awaitable[None]]:
        engine = self.engine
        if operation == "abort":
            return self._abort(arguments)
        method = getattr(engine, operation)
        kwargs = _bind(method, operation, arguments, self._decoders)
        encode = _RESULTS.get(operation, lambda result: None)

        async def run(op: Operation) -> None:
            op.emit({"event": "accepted"})
            result = await method(**kwargs)
            op.finish({"event": "result", "result": encode(result), "state": await engine_state(engine)})

        return run

    def _abort(self, arguments: dict[str, Any]) -> Callable[[Operation], Awaitable[None]]:
        unknown = sorted(set(arguments) - {"request_ids", "pending_ids"})
        if unknown:
            raise ConfigError(unknown[0], "is not an argument of abort; it takes ['request_ids', 'pending_ids']")
        ids = arguments.get("request_ids")
        pending = arguments.get("pending_ids") or []
        for name, value in (("request_ids", ids), ("pending_ids", pending)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(name, "expected a list of request ids (or null: every request)")
        engine, log = self.engine, self.log

        async def run(op: Operation) -> None:
            op.emit({"event": "accepted"})
            # Ids this server has not received yet were sent by the caller and are still on their
            # way: remembered, and aborted when they arrive.
            running = set(log.running_ids())
            log.remember_aborted([rid for rid in pending if rid not in running])
            if ids is not None:
                log.split_abort(ids)
            await engine.abort(ids)
            op.finish({"event": "result", "result": None, "state": await engine_state(engine)})

        return run

    def _generation(self, arguments: dict[str, Any]) -> Callable[[Operation], Awaitable[None]]:
        arguments = dict(arguments)
        stream = arguments.pop("stream", False)
        if not isinstance(stream, bool):
            raise ConfigError("stream", f"expected true or false, got {stream!r}")
        request = wire.generate_request_from_json(arguments)
        engine, log = self.engine, self.log

        async def run(op: Operation) -> None:
            log.track(op, sample_request_ids(request))
            try:
                if stream:
                    work = asyncio.ensure_future(_pump(op, engine.generate_stream(request)))
                else:
                    work = asyncio.ensure_future(engine.generate(request))
                await asyncio.sleep(0)  # the engine admits the request (and counts it in flight) first
                op.emit({"event": "accepted"})
                early = log.aborted_before_arrival(op)
                if early:
                    await engine.abort(early)
                result = await work
                op.finish({"event": "result", "result": None if stream else wire.output_to_json(result)})
            finally:
                log.untrack(op)

        return run

    async def _respond(self, op: Operation, media: str, start: int) -> Response:
        if media == "application/json":
            op.attach()
            try:
                terminal = await op.wait()
            finally:
                op.detach(self._abandon, self.log.orphan_grace_s)
            if terminal["event"] == "error":
                return _json({"error": terminal["error"]}, terminal["status"])
            return _json({k: v for k, v in terminal.items() if k != "event"})

        async def events() -> AsyncIterator[bytes]:
            op.attach()
            try:
                async for event in op.read(start):
                    data = wire.dumps(event)
                    yield data + b"\n" if media == wire.NDJSON else b"data: " + data + b"\n\n"
            finally:
                op.detach(self._abandon, self.log.orphan_grace_s)

        return StreamingResponse(events(), media_type=media, headers={"Cache-Control": "no-cache",
                                                                      "X-Accel-Buffering": "no"})

    def _abandon(self, op: Operation) -> None:
        """A generation nobody reads any more: abort it, as closing a local stream does."""
        logger.info("aborting %d request(s) of an abandoned generation", len(op.sample_ids))
        task = asyncio.ensure_future(_quietly(self.engine.abort(list(op.sample_ids))))
        _background.add(task)  # referenced until done: a task nobody holds may be collected mid-flight
        task.add_done_callback(_background.discard)

    async def probe(self, request: Request) -> Response:
        try:
            body = wire.loads(await request.body())
            content = same_host.read_probe(body.get("segment") if isinstance(body, dict) else None)
        except ValueError as exc:
            return _error(ConfigError("segment", str(exc)))
        return _json({"content": content})


_background: set[asyncio.Task[Any]] = set()


async def _pump(op: Operation, stream: AsyncIterator[Any]) -> None:
    async for chunk in stream:
        await op.accepted.wait()  # chunks follow the acceptance event
        op.emit({"event": "chunk", "chunk": wire.chunk_to_json(chunk)})


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:  # the engine may be gone; nothing is waiting for this
        logger.debug("abort of an abandoned generation failed: %r", exc)


def _sizes(sizes: Any) -> dict[str, int]:
    return {name: int(getattr(sizes, name)) for name in ("tensor", "pipeline", "data", "expert")}


# -- the app ---------------------------------------------------------------------------------------------
def create_engine_app(engines: Sequence[Any] | Any, *, api_key: str | None = None,
                      settings: HTTPSettings | None = None, log: OperationLog | None = None) -> Any:
    """The engine API of ``engines`` (one engine, or several), as an ASGI app behind the endpoint's
    guards (:func:`skyrl_backends.http.guards.guard_app`: concurrency, Host, the API key on every
    engine route, JSON content type, body size and time). ``settings`` defaults to the endpoint's
    limits with request bodies up to :data:`DEFAULT_ENGINE_API_MAX_BODY_BYTES`."""
    engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
    if not engines:
        raise ValueError("the engine API needs at least one engine")
    app = FastAPI(title="skyrl-backends engine API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.operations = log if log is not None else OperationLog()
    prefixes: list[tuple[str, EngineRoutes]] = []
    for index, engine in enumerate(engines):
        routes = EngineRoutes(engine, app.state.operations, index, len(engines))
        prefixes.append((f"{wire.API_PREFIX}/engines/{index}", routes))
        if len(engines) == 1:
            prefixes.append((wire.API_PREFIX, routes))
    for prefix, routes in prefixes:
        _mount(app, prefix, routes)

    @app.api_route(wire.API_PREFIX + "/{rest:path}", methods=["GET", "POST"])
    async def unknown(rest: str) -> Response:
        where = (f"this server runs {len(engines)} engines: their APIs are under {wire.API_PREFIX}/engines/<0.."
                 f"{len(engines) - 1}>" if len(engines) > 1 else f"see {wire.API_PREFIX}/info")
        return _json({"error": {"message": f"no engine route {rest!r}; {where}", "type": "not_found_error",
                                "code": None, "param": None, "exception": None, "fields": {}}}, 404)

    @app.exception_handler(Exception)
    async def _any_error(_request: Request, exc: Exception) -> Response:
        if wire.status_of(exc) >= 500:
            logger.exception("engine API request failed", exc_info=exc)
        return _error(exc)

    settings = settings if settings is not None else HTTPSettings(max_body_bytes=DEFAULT_ENGINE_API_MAX_BODY_BYTES)
    return guard_app(app, settings, api_key, fastapi_app=app)


def _mount(app: FastAPI, prefix: str, routes: EngineRoutes) -> None:
    app.add_api_route(prefix + "/info", routes.info, methods=["GET"])
    app.add_api_route(prefix + "/health", routes.health, methods=["GET"])

    async def state() -> dict[str, Any]:
        return await engine_state(routes.engine)

    async def capabilities() -> dict[str, Any]:
        return wire.capabilities_to_json(routes.engine.capabilities)

    async def weight_version() -> dict[str, Any]:
        return {"weight_version": (await engine_state(routes.engine))["weight_version"]}

    app.add_api_route(prefix + "/state", state, methods=["GET"])
    app.add_api_route(prefix + "/capabilities", capabilities, methods=["GET"])
    app.add_api_route(prefix + "/weights/version", weight_version, methods=["GET"])
    app.add_api_route(prefix + "/weights/specs", routes.weight_specs, methods=["GET"])
    app.add_api_route(prefix + "/host/probe", routes.probe, methods=["POST"])
    for operation, path in wire.POST_OPERATIONS.items():
        app.add_api_route(prefix + path, _poster(routes, operation), methods=["POST"])


def _poster(routes: EngineRoutes, operation: str) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        return await routes.post(request, operation)

    handler.__name__ = f"post_{operation}"
    return handler


__all__ = ["DEFAULT_ENGINE_API_MAX_BODY_BYTES", "EngineRoutes", "create_engine_app", "engine_state",
           "health_status"]
