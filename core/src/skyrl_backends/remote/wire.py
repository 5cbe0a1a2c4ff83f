"""The engine protocol's wire format: every value an engine call takes or returns, as JSON.

Both sides use this module: the server (:mod:`skyrl_backends.http.engine_routes`) and the remote
engine's skyrl dialect (:mod:`skyrl_backends.remote.dialect`). It imports neither FastAPI nor httpx
nor torch. Nothing that arrives is unpickled or evaluated: each value is rebuilt field by field into
the library's own types, and a malformed field is a :class:`~skyrl_backends.errors.ConfigError`
naming it.

Forward compatibility: dataclasses travel field by field (a field of plain JSON values added to
``Completion`` or ``GenerateRequest`` on both sides travels with no change here; one of the library's
own types, as ``token_versions``, needs its encoding here), sampling parameters travel as the
fields that differ from their defaults, and keyword arguments of control calls travel by name (a new
keyword of ``pause_generation``, say, reaches the engine as it is).

Errors travel as ``{"error": {"message", "type", "code", "exception", "fields"}}``: ``type`` and
``code`` in OpenAI's manner (so generic HTTP clients read them), ``exception`` the class name and
``fields`` its public attributes, from which the other side rebuilds the same exception class
(:func:`error_from_json`) from an allow-list.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from skyrl_backends import errors as _errors
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, RemoteEngineError, SkyRLBackendsError
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
)

WIRE_VERSION = 1
API_PREFIX = "/skyrl/v1"
DIALECT = "skyrl"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# How many events of an operation the caller has already seen (a retry resumes after them).
RESUME_HEADER = "X-Skyrl-Resume-From"
# The server's answer: "new" (the call starts now) or "attached" (the key's call was already running or done).
OPERATION_HEADER = "X-Skyrl-Operation"

# Engine operations reached by POST, by the Engine method they call: path under API_PREFIX.
POST_OPERATIONS: dict[str, str] = {
    "generate": "/generate",
    "abort": "/abort",
    "pause_generation": "/pause",
    "resume_generation": "/resume",
    "sleep": "/sleep",
    "wake_up": "/wake_up",
    "validate_weight_update": "/weights/validate",
    "update_named_weights": "/weights/update",
    "init_weight_update_communicator": "/weights/init_communicator",
    "load_lora_adapter": "/lora/load",
    "validate_lora_adapter_from_tensors": "/lora/validate_from_tensors",
    "load_lora_adapter_from_tensors": "/lora/load_from_tensors",
    "unload_lora_adapter": "/lora/unload",
    "reset_prefix_cache": "/reset_prefix_cache",
}


def dumps(value: Any) -> bytes:
    """Compact JSON; non-finite floats (a log-probability of ``-inf``) are written as JSON's
    ``-Infinity`` extension, which Python's and JavaScript's parsers both read."""
    return json.dumps(value, separators=(",", ":"), allow_nan=True, ensure_ascii=False).encode()


def loads(raw: bytes | str) -> Any:
    return json.loads(raw)


# -- small checks ---------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    _expect(isinstance(value, Mapping), field, f"expected a JSON object, got {type(value).__name__}")
    return value


def _str_list(value: Any, field: str, allow_none_items: bool = False) -> list[Any]:
    ok = isinstance(value, list) and all(isinstance(v, str) or (allow_none_items and v is None) for v in value)
    _expect(ok, field, "expected a list of strings" + (" or nulls" if allow_none_items else ""))
    return list(value)


def _known_fields(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; {where} takes {sorted(names)}")
    return dict(values)


# -- sampling parameters and requests ---------------------------------------------------------------
def sampling_to_json(params: SamplingParams) -> dict[str, Any]:
    """The fields that differ from their defaults (so an older server reads a newer client's
    parameters as long as it is not asked for something it does not know)."""
    values = params.to_dict()
    return {name: values[name] for name in sorted(params.uses())}


def generate_request_to_json(request: GenerateRequest) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name == "sampling_params":
            values[f.name] = sampling_to_json(value)
        elif value is not None:
            values[f.name] = value
    return values


def generate_request_from_json(value: Any) -> GenerateRequest:
    """A GenerateRequest from its JSON form; every malformed field is a ConfigError naming it
    (GenerateRequest and SamplingParams check the values themselves)."""
    fields = _known_fields(GenerateRequest, _mapping(value, "request"), "request")
    _expect("prompt_token_ids" in fields, "request.prompt_token_ids", "is required")
    prompts = fields["prompt_token_ids"]
    _expect(isinstance(prompts, list) and all(isinstance(p, list) for p in prompts), "request.prompt_token_ids",
            "expected a list of prompts, each a list of token ids")
    if "sampling_params" in fields:
        fields["sampling_params"] = SamplingParams.from_dict(_mapping(fields["sampling_params"],
                                                                      "request.sampling_params"))
    if fields.get("request_ids") is not None:
        fields["request_ids"] = _str_list(fields["request_ids"], "request.request_ids")
    if fields.get("session_ids") is not None:
        fields["session_ids"] = _str_list(fields["session_ids"], "request.session_ids", allow_none_items=True)
    if fields.get("lora_name") is not None:
        _expect(isinstance(fields["lora_name"], str), "request.lora_name", "expected a string or null")
    return GenerateRequest(**fields)


# -- completions and chunks -----------------------------------------------------------------------
def _top_to_json(top: list[dict[int, float]] | None) -> Any:
    # JSON object keys are strings; token ids stay integers as [id, logprob] pairs.
    return None if top is None else [[[int(t), lp] for t, lp in step.items()] for step in top]


def _top_from_json(value: Any, field: str) -> list[dict[int, float]] | None:
    if value is None:
        return None
    _expect(isinstance(value, list), field, "expected a list of steps")
    steps = []
    for step in value:
        _expect(isinstance(step, list) and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0])
                                               for p in step), field, "expected [[token_id, logprob], ...] per step")
        steps.append({int(t): float(lp) for t, lp in step})
    return steps


def _versions_to_json(versions: TokenVersions | None, num_tokens: int, field: str) -> Any:
    # Runs only ([[start, version], ...], as the HTTP responses carry them): their length is the
    # number of tokens beside them, which the engine facade guarantees (version_labels.labelled).
    if versions is None:
        return None
    if versions.length != num_tokens:
        raise ValueError(f"{field} cover {versions.length} token(s) of {num_tokens}")
    return versions.to_json()


def _versions_from_json(value: Any, num_tokens: int, field: str) -> TokenVersions | None:
    if value is None:
        return None
    _expect(isinstance(value, list) and all(isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r)
                                            for r in value), field, "expected [[start, version], ...]")
    try:
        return TokenVersions.from_json(value, num_tokens)
    except ValueError as exc:
        raise ConfigError(field, f"{exc} (of {num_tokens} token(s))") from None


def _token_ids(value: Any, field: str) -> list[int]:
    _expect(isinstance(value, list) and all(_is_int(t) for t in value), field, "expected a list of token ids")
    return list(value)


def completion_to_json(completion: Completion) -> dict[str, Any]:
    values = {f.name: getattr(completion, f.name) for f in dataclasses.fields(completion)}
    values["top_logprobs"] = _top_to_json(completion.top_logprobs)
    values["token_versions"] = _versions_to_json(completion.token_versions, len(completion.token_ids),
                                                 "completion.token_versions")
    return values


def completion_from_json(value: Any) -> Completion:
    raw = _mapping(value, "completion")
    names = {f.name for f in dataclasses.fields(Completion)}
    # A newer server may send fields this side does not know: they are left out, never guessed.
    fields = {k: v for k, v in raw.items() if k in names}
    fields["token_ids"] = _token_ids(fields.get("token_ids"), "completion.token_ids")
    fields["top_logprobs"] = _top_from_json(fields.get("top_logprobs"), "completion.top_logprobs")
    fields["token_versions"] = _versions_from_json(fields.get("token_versions"), len(fields["token_ids"]),
                                                   "completion.token_versions")
    lora_version = fields.get("lora_version")
    _expect(lora_version is None or _is_int(lora_version), "completion.lora_version", "expected an integer or null")
    return Completion(**fields)


def output_to_json(output: GenerateOutput) -> dict[str, Any]:
    return {"completions": [completion_to_json(c) for c in output.completions]}


def output_from_json(value: Any) -> GenerateOutput:
    completions = _mapping(value, "result").get("completions")
    _expect(isinstance(completions, list), "result.completions", "expected a list")
    return GenerateOutput([completion_from_json(c) for c in completions])


def chunk_to_json(chunk: StreamChunk) -> dict[str, Any]:
    return {"index": chunk.index, "token_ids": chunk.token_ids, "logprobs": chunk.logprobs,
            "top_logprobs": _top_to_json(chunk.top_logprobs),
            "token_versions": _versions_to_json(chunk.token_versions, len(chunk.token_ids), "chunk.token_versions"),
            "completion": None if chunk.completion is None else completion_to_json(chunk.completion)}


def chunk_from_json(value: Any) -> StreamChunk:
    raw = _mapping(value, "chunk")
    _expect(_is_int(raw.get("index")), "chunk.index", "expected an integer")
    tokens = _token_ids(raw.get("token_ids") or [], "chunk.token_ids")
    completion = raw.get("completion")
    return StreamChunk(index=raw["index"], token_ids=tokens, logprobs=raw.get("logprobs"),
                       top_logprobs=_top_from_json(raw.get("top_logprobs"), "chunk.top_logprobs"),
                       completion=None if completion is None else completion_from_json(completion),
                       token_versions=_versions_from_json(raw.get("token_versions"), len(tokens),
                                                          "chunk.token_versions"))


# -- engine description -----------------------------------------------------------------------------
def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in caps.to_dict().items()}


def capabilities_from_json(value: Any) -> Capabilities:
    return Capabilities.from_dict(_mapping(value, "capabilities"))


def parallel_sizes_from_json(value: Any) -> ParallelSizes:
    raw = _mapping(value, "parallel_sizes")
    names = {f.name for f in dataclasses.fields(ParallelSizes)}
    return ParallelSizes(**{k: int(v) for k, v in raw.items() if k in names})


# Generator-config fields a server never describes: keys, and engine-specific keyword arguments
# (arbitrary values, credentials among them for some engines).
PRIVATE_CONFIG_FIELDS: tuple[str, ...] = ("remote_inference_engine_api_key", "http_endpoint_api_key",
                                          "engine_init_kwargs")


def config_to_json(config: GeneratorConfig | None) -> dict[str, Any] | None:
    """The server engine's generator config as the remote engine sees it (``RemoteEngine.config``),
    less :data:`PRIVATE_CONFIG_FIELDS`; None when the engine has no GeneratorConfig."""
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    values = {k: v for k, v in to_dict().items() if k not in PRIVATE_CONFIG_FIELDS}
    return values if _jsonable(values) else None


def config_from_json(value: Any) -> GeneratorConfig | None:
    """A GeneratorConfig from :func:`config_to_json` (fields this side does not know are left out);
    None when the server described none or one this side cannot read (the engine works without it)."""
    if not isinstance(value, Mapping):
        return None
    known = set(GeneratorConfig.field_names())
    try:
        return GeneratorConfig.from_dict({k: v for k, v in value.items() if k in known})
    except (ConfigError, TypeError, ValueError):
        return None


def specs_to_json(specs: Mapping[str, TensorSpec] | Sequence[TensorSpec]) -> list[dict[str, Any]]:
    values = specs.values() if isinstance(specs, Mapping) else specs
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype,
             **({"tied_to": s.tied_to} if s.tied_to is not None else {})} for s in values]


def specs_from_json(value: Any) -> dict[str, TensorSpec]:
    _expect(isinstance(value, list), "specs", "expected a list")
    specs = {}
    for i, raw in enumerate(value):
        raw = _mapping(raw, f"specs[{i}]")
        tied_to = raw.get("tied_to")
        _expect(tied_to is None or isinstance(tied_to, str), f"specs[{i}].tied_to", "expected a name or null")
        specs[raw["name"]] = TensorSpec(raw["name"], tuple(int(d) for d in raw["shape"]), raw["dtype"], tied_to)
    return specs


def init_info_to_json(info: WeightSyncInitInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def init_info_from_json(value: Any) -> WeightSyncInitInfo:
    """Addresses, ranks and the group's backend (gloo or NCCL), checked by type here and by value
    by the engine's receiver."""
    fields = _known_fields(WeightSyncInitInfo, _mapping(value, "init_info"), "init_info")
    for name in ("master_addr", "group_name", "backend", "strategy"):
        if name in fields:
            _expect(isinstance(fields[name], str), f"init_info.{name}", "expected a string")
    for name in ("master_port", "rank_offset", "world_size"):
        if name in fields:
            _expect(_is_int(fields[name]), f"init_info.{name}", "expected an integer")
    if "extra" in fields:
        fields["extra"] = dict(_mapping(fields["extra"], "init_info.extra"))
    try:
        return WeightSyncInitInfo(**fields)
    except TypeError as exc:  # a required field is missing
        raise ConfigError("init_info", str(exc)) from None


# -- errors -----------------------------------------------------------------------------------------
# Built-in exceptions an engine raises for a caller's mistake or a failure the caller handles by type.
_BUILTIN_ERRORS = ("ValueError", "TypeError", "KeyError", "IndexError", "LookupError", "NotImplementedError",
                   "RuntimeError", "TimeoutError", "ConnectionError")


def _error_classes() -> dict[str, type[BaseException]]:
    classes: dict[str, type[BaseException]] = {name: getattr(builtins, name) for name in _BUILTIN_ERRORS}
    for name, value in vars(_errors).items():
        if isinstance(value, type) and issubclass(value, SkyRLBackendsError):
            classes[name] = value
    return classes


ERROR_CLASSES = _error_classes()


def status_of(exc: BaseException) -> int:
    """The HTTP status a server answers ``exc`` with."""
    if isinstance(exc, ConfigError):
        return 400
    if isinstance(exc, (_errors.UnsupportedCapabilityError, _errors.WeightUpdateError, _errors.LoraAdapterError)):
        return 400
    if isinstance(exc, (_errors.EngineDeadError, _errors.EngineClosedError)):
        return 503
    if isinstance(exc, _errors.EngineStateError):
        return 409
    if isinstance(exc, TimeoutError):
        return 504
    return 500


def _category(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status in (503, 504):
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def error_to_json(exc: BaseException, status: int | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` for ``exc``; its public attributes travel as ``fields`` (an attribute that
    is not JSON, an exception held as a cause say, travels as its text)."""
    status = status_of(exc) if status is None else status
    fields = {}
    for key, value in vars(exc).items():
        if key.startswith("_"):
            continue
        fields[key] = value if _jsonable(value) else str(value)
    message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    param = getattr(exc, "field", None)
    return {"error": {"message": message, "type": _category(status), "code": None,
                      "param": param if isinstance(param, str) else None,
                      "exception": type(exc).__name__, "fields": fields}}


def error_from_json(body: Any, status: int) -> BaseException:
    """The exception a server reported: the same class as on the server when it is one of the
    library's errors or a common built-in, rebuilt with the same message and attributes; otherwise
    :class:`~skyrl_backends.errors.RemoteEngineError` naming what the server raised. Bodies that are
    not this module's (a proxy's HTML page, OpenAI-style errors of the HTTP guards) become
    RemoteEngineError or, for an API key the server refused, a ConfigError naming the key."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        text = body if isinstance(body, str) else json.dumps(body)[:500]
        return RemoteEngineError(f"HTTP {status}", f"the server answered HTTP {status}: {text}", status)
    message = str(error.get("message", ""))
    name = error.get("exception")
    cls = ERROR_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        if status == 401:
            return ConfigError("remote_inference_engine_api_key", f"the server refused the API key: {message}")
        return RemoteEngineError(str(name or error.get("type") or f"HTTP {status}"), message, status)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    fields = error.get("fields")
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            if isinstance(key, str) and key.isidentifier() and not key.startswith("_"):
                setattr(exc, key, value)
    if isinstance(exc, _errors.WeightUpdateError) and not isinstance(getattr(exc, "problems", None), dict):
        exc.problems = {}
    return exc


def is_loading(body: Any, status: int) -> bool:
    """Whether an answer says the server is up but its engine is still loading."""
    return status == 503 and isinstance(body, Mapping) and body.get("status") == "loading"


def is_busy(body: Any, status: int) -> bool:
    """Whether an answer refused the call, before starting it, for too many requests at once."""
    error = body.get("error") if isinstance(body, Mapping) else None
    return status == 503 and isinstance(error, Mapping) and error.get("code") == "too_many_requests"


__all__ = [
    "API_PREFIX", "DIALECT", "ERROR_CLASSES", "IDEMPOTENCY_HEADER", "NDJSON", "OPERATION_HEADER", "POST_OPERATIONS",
    "PRIVATE_CONFIG_FIELDS", "RESUME_HEADER", "SSE", "WIRE_VERSION", "capabilities_from_json", "capabilities_to_json",
    "chunk_from_json", "chunk_to_json", "completion_from_json", "completion_to_json", "config_from_json",
    "config_to_json", "dumps", "error_from_json", "error_to_json", "generate_request_from_json",
    "generate_request_to_json", "init_info_from_json", "init_info_to_json", "is_busy", "is_loading", "loads",
    "output_from_json", "output_to_json", "parallel_sizes_from_json", "sampling_to_json", "specs_from_json",
    "specs_to_json", "status_of",
]
