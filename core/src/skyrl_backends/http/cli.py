"""``skyrl-backends serve``: engines, the client and the OpenAI-compatible endpoint in one command,
and the engine API (``/skyrl/v1``, :mod:`skyrl_backends.http.engine_routes`) that remote engines use.

    skyrl-backends serve --backend transformers --model DIR [--num-engines N] [--host 127.0.0.1]
                         [--port 8000] [--api-key KEY] [--ray] [limits: see --help]
    skyrl-backends serve generator.backend=sglang generator.model=DIR generator.dtype=bfloat16

Engine options come as the design's dotted overrides (``generator.KEY=VALUE``, values read as YAML),
as ``--engine-option KEY=VALUE`` or through ``--backend``/``--model``; all are checked by the
generator config's one rule (:mod:`skyrl_backends.config`).

Picked up by the core CLI when this module imports; it imports nothing heavy until the command runs,
so the command is listed without the ``http`` extra and then says how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from skyrl_backends.engine_options import HELP as ENGINE_OPTION_HELP
from skyrl_backends.engine_options import parse_engine_options
from skyrl_backends.errors import ConfigError

# What the endpoint imports, as the core's `http` extra declares it (core/pyproject.toml).
HTTP_EXTRA = {"fastapi": None, "uvicorn": None, "pydantic": "2"}
INSTALL_HTTP = "pip install 'skyrl-backends[http]'"


def add_subcommand(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="serve engines behind an OpenAI-compatible HTTP endpoint")
    serve.add_argument("overrides", nargs="*", metavar="generator.KEY=VALUE",
                       help="generator-config overrides in the design's dotted syntax, e.g. generator.backend=sglang")
    serve.add_argument("--backend", default=None,
                       help="backend name (see `skyrl-backends plugins`; default: transformers)")
    serve.add_argument("--model", default=None, help="model folder (also the tokenizer unless --tokenizer)")
    serve.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    serve.add_argument("--served-model-name", default=None, help="name clients use in `model` (default: folder name)")
    serve.add_argument("--num-engines", type=int, default=1)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback; 0.0.0.0 exposes the server: use --api-key)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("SKYRL_BACKENDS_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $SKYRL_BACKENDS_API_KEY)")
    _add_limit_flags(serve)
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds an engine may take for one call before it is marked unhealthy and its "
                            "requests fail over (0: no limit)")
    serve.add_argument("--ray", action="store_true", help="run each engine as a Ray actor (local Ray if none)")
    serve.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a generator-config option for every engine: {ENGINE_OPTION_HELP}")
    serve.add_argument("--allow-no-api-key", action="store_true",
                       help="serve on a non-loopback address without an API key (refused otherwise: whoever reaches "
                            "the port could drive the engines, weights and LoRA adapters included)")
    serve.add_argument("--no-engine-api", action="store_true",
                       help="serve the OpenAI endpoint only, not the engine API under /skyrl/v1")
    serve.add_argument("--engine-api-max-body-bytes", type=int, default=None,
                       help="largest engine-API request body (default 64 MiB: a rollout batch of token ids); the "
                            "other limits are the endpoint's")
    serve.add_argument("--url-file", default=None,
                       help="write the server's URL to this file once its port is bound (with --port 0: a free port)")
    serve.add_argument("--stop-on-stdin-close", action="store_true",
                       help="stop when standard input closes (a parent process that started the server died)")
    serve.add_argument("--weight-transfer-config", default=None, metavar="JSON",
                       help="vLLM's flag: the weight-transfer backend of vLLM's RL routes "
                            "(/init_weight_transfer_engine ...), '{\"backend\": \"skyrl\"}' (skyrl's strategies); "
                            "without it those routes answer as vLLM's do when weight transfer is not configured")
    serve.add_argument("--no-vllm-rl-api", action="store_true",
                       help="do not serve vLLM's RL routes (/pause, /resume, /sleep, /wake_up, weight transfer ...)")
    serve.set_defaults(func=_cmd_serve)


# Flags of HTTPSettings, with their help (the defaults come from HTTPSettings itself).
_LIMIT_HELP = {
    "max_body_bytes": "largest request body accepted (413 above)",
    "body_timeout_s": "seconds the whole request body may take to arrive (408 after)",
    "header_timeout_s": "seconds a request's headers may take to arrive (408 and close after)",
    "keep_alive_timeout_s": "seconds an idle keep-alive connection stays open",
    "max_concurrent_requests": "requests in progress at once (503 above)",
    "max_connections": "open connections at once (uvicorn's limit_concurrency; 503 above)",
    "max_prompts_per_request": "prompts in one /v1/completions request",
    "max_n": "samples per prompt (n)",
    "max_sequences_per_request": "prompts x n in one request",
    "max_model_len": "context length (prompt + max_tokens) requests are checked against "
                     "(default: the engines' max_model_len, else the model's config.json)",
}


def _add_limit_flags(serve: Any) -> None:
    from dataclasses import fields

    from skyrl_backends.http.settings import FLAGS, HTTPSettings

    defaults = HTTPSettings()
    for f in fields(HTTPSettings):
        if f.name not in _LIMIT_HELP:
            continue
        kind = float if f.name.endswith("_s") else int
        serve.add_argument(FLAGS[f.name], dest=f.name, type=kind, default=getattr(defaults, f.name),
                           help=f"{_LIMIT_HELP[f.name]} (default: {getattr(defaults, f.name)})")
    serve.add_argument("--allowed-hosts", default=None,
                       help="comma-separated Host names served besides localhost on a loopback bind "
                            "(against DNS rebinding); '*' accepts any")
    serve.add_argument("--uvicorn-log-level", default=defaults.uvicorn_log_level,
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help=f"uvicorn's log level (default: {defaults.uvicorn_log_level})")


def http_settings(args: argparse.Namespace) -> Any:
    """The HTTPSettings the parsed flags ask for."""
    from skyrl_backends.http.settings import HTTPSettings

    values = {name: getattr(args, name) for name in _LIMIT_HELP}
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) if args.allowed_hosts else None
    try:
        return HTTPSettings(**values, allowed_hosts=hosts, uvicorn_log_level=args.uvicorn_log_level)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _engine_options(pairs: list[str]) -> dict[str, Any]:
    try:
        return parse_engine_options(pairs)
    except ConfigError as exc:
        raise SystemExit(f"skyrl-backends serve: {exc}") from exc


def http_extra_problem(installed: dict[str, str | None]) -> str | None:
    """What keeps the endpoint from running, given the installed version of each package of
    :data:`HTTP_EXTRA` (None: not installed), or None when nothing does."""
    missing = [name for name in HTTP_EXTRA if installed.get(name) is None]
    if missing:
        return f"needs the http extra ({', '.join(missing)} not installed): {INSTALL_HTTP}"
    for name, least_major in HTTP_EXTRA.items():
        version = installed[name] or ""
        if least_major and not _major_at_least(version, int(least_major)):
            return f"needs {name}>={least_major} ({name} {version} is installed): {INSTALL_HTTP}"
    return None


def _major_at_least(version: str, major: int) -> bool:
    head = version.split(".", 1)[0]
    return head.isdigit() and int(head) >= major


def installed_versions(names: Any) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _generator_config(args: argparse.Namespace) -> Any:
    """One generator config from the overrides, then --engine-option, --backend and --model."""
    from skyrl_backends.config import load_config, parse_overrides

    values = parse_overrides(args.overrides)
    values.update(_engine_options(args.engine_option))
    if args.backend is not None:
        values["backend"] = args.backend
    if args.model is not None:
        values["model"] = args.model
    config = load_config(values)
    if config.model is None:
        raise SystemExit("serve needs a model: --model DIR or generator.model=DIR")
    return config


def _weight_transfer_backend(args: argparse.Namespace) -> str | None:
    from skyrl_backends.weight_sync.phases import parse_weight_transfer_config

    try:
        return parse_weight_transfer_config(args.weight_transfer_config)
    except ConfigError as exc:
        raise SystemExit(f"skyrl-backends serve: {exc}") from None


async def _vllm_rl_options(args: argparse.Namespace, client: Any, name: str, settings: Any) -> Any:
    """What vLLM's RL routes need (None with --no-vllm-rl-api)."""
    if args.no_vllm_rl_api:
        return None
    from skyrl_backends.http.engine_info import context_length
    from skyrl_backends.http.vllm_rl_routes import VLLMRLOptions, engines_dtype

    return VLLMRLOptions(model_name=name, model_path=args.model, dtype=await engines_dtype(client),
                         max_model_len=context_length(client, settings.max_model_len),
                         weight_transfer_backend=_weight_transfer_backend(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    problem = http_extra_problem(installed_versions(HTTP_EXTRA))
    if problem:
        raise SystemExit(f"skyrl-backends serve: {problem}")
    if args.num_engines < 1:
        raise SystemExit("--num-engines must be >= 1")
    _generator_config(args)  # a bad option is reported before anything starts
    from skyrl_backends.http.engine_server import check_exposure

    try:
        check_exposure(args.host, args.api_key, args.allow_no_api_key,
                       engine_api=not (args.no_engine_api and args.no_vllm_rl_api))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    _weight_transfer_backend(args)
    try:  # uvicorn.run would pick uvloop too; vLLM's own server runs on it
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from skyrl_backends.http.engine_server import LoadingResponder, stop_on_stdin_close, write_url_file
    from skyrl_backends.http.server import bind_socket, uvicorn_config

    _exit_on_sigterm()
    if args.stop_on_stdin_close:
        stop_on_stdin_close()
    settings = http_settings(args)
    # The port is bound first and answers "loading" until the engines are up (see engine_server).
    sock = bind_socket(args.host, args.port)
    loading = LoadingResponder(sock).start()
    if args.url_file:
        write_url_file(args.url_file, sock)
    try:
        client, app, name = await _serving_app(args, settings)
    except BaseException:
        loading.stop()
        sock.close()
        raise
    loading.stop()
    host, port = sock.getsockname()[:2]
    print(f"serving {name!r} ({args.backend}, {args.num_engines} engine(s)) on http://{host}:{port}/v1"
          + ("" if args.no_engine_api else f", engine API on http://{host}:{port}/skyrl/v1"), flush=True)
    try:
        import uvicorn

        await uvicorn.Server(uvicorn_config(app, settings)).serve(sockets=[sock])
    finally:
        await client.teardown()


def _exit_on_sigterm() -> None:
    """SIGTERM ends the server through ``SystemExit``, so the engines are torn down on the way out.

    uvicorn takes SIGTERM while it serves and, once stopped, raises it again under the handler it
    found; under the default one that kills the process there, before ``_serve`` tears its engines
    down, and an engine's own processes (vLLM's engine core) outlive the server."""
    import signal

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)


async def _serving_app(args: argparse.Namespace, settings: Any) -> Any:
    from transformers import AutoTokenizer

    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.config import REMOTE_FIELDS
    from skyrl_backends.http.app import create_app
    from skyrl_backends.http.engine_routes import DEFAULT_ENGINE_API_MAX_BODY_BYTES, create_engine_app
    from skyrl_backends.http.engine_server import with_engine_api

    config = _generator_config(args)
    if settings.max_model_len is not None and config.max_model_len is None:  # as vLLM's flag: the engines' too
        config = config.replace(max_model_len=settings.max_model_len)
    # The engines are this server's own (a config written for the trainer's side may name remote ones).
    options = {k: v for k, v in config.to_dict().items() if k not in ("backend", "model", *REMOTE_FIELDS)}
    args.backend, args.model = config.backend, config.model
    if args.ray:
        import ray

        from skyrl_backends.ray_wrapper import create_ray_engines

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        engines = create_ray_engines(args.num_engines, args.backend, args.model, **options)
    else:
        import skyrl_backends as sb

        engines = [sb.create_engine(args.backend, model=args.model, **options) for _ in range(args.num_engines)]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    client = InferenceEngineClient(engines, tokenizer=tokenizer, request_timeout=args.request_timeout or None)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(client, tokenizer, model_name=name, api_key=args.api_key, settings=settings,
                     vllm_rl=await _vllm_rl_options(args, client, name, settings))
    if not args.no_engine_api:
        engine_settings = settings.replace(
            max_body_bytes=args.engine_api_max_body_bytes or DEFAULT_ENGINE_API_MAX_BODY_BYTES)
        app = with_engine_api(app, create_engine_app(engines, api_key=args.api_key, settings=engine_settings))
    return client, app, name
