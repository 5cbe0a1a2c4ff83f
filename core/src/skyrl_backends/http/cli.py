"""``skyrl-backends serve``: engines, the client and the OpenAI-compatible endpoint in one command,
and the engine API (``/skyrl/v1``, :mod:`skyrl_backends.http.engine_routes`) that remote engines use.

    skyrl-backends serve --backend transformers --model DIR [--num-engines N] [--host 127.0.0.1]
                         [--port 8000] [--api-key KEY] [--ray]
    skyrl-backends serve generator.backend=sglang generator.model=DIR generator.dtype=bfloat16

Engine options come as the design's dotted overrides (``generator.KEY=VALUE``, values read as YAML),
as ``--engine-option KEY=VALUE`` or through ``--backend``/``--model``; all are checked by the
generator config's one rule (:mod:`skyrl_backends.config`).

Picked up by the core CLI when this module imports; it imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any


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
    serve.add_argument("--max-body-bytes", type=int, default=None)
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds an engine may take for one call before it is marked unhealthy and its "
                            "requests fail over (0: no limit)")
    serve.add_argument("--ray", action="store_true", help="run each engine as a Ray actor (local Ray if none)")
    serve.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a generator-config option for every engine (YAML value), repeatable")
    serve.add_argument("--allow-no-api-key", action="store_true",
                       help="serve on a non-loopback address without an API key (refused otherwise: whoever reaches "
                            "the port could drive the engines, weights and LoRA adapters included)")
    serve.add_argument("--no-engine-api", action="store_true",
                       help="serve the OpenAI endpoint only, not the engine API under /skyrl/v1")
    serve.add_argument("--engine-api-max-body-bytes", type=int, default=None,
                       help="largest engine-API request body (default 64 MiB: a rollout batch of token ids)")
    serve.add_argument("--url-file", default=None,
                       help="write the server's URL to this file once its port is bound (with --port 0: a free port)")
    serve.add_argument("--stop-on-stdin-close", action="store_true",
                       help="stop when standard input closes (a parent process that started the server died)")
    serve.set_defaults(func=_cmd_serve)


def _engine_options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-option expects KEY=VALUE, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


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


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.num_engines < 1:
        raise SystemExit("--num-engines must be >= 1")
    _generator_config(args)  # a bad option is reported before anything starts
    from skyrl_backends.errors import ConfigError
    from skyrl_backends.http.engine_server import check_exposure

    try:
        check_exposure(args.host, args.api_key, args.allow_no_api_key, engine_api=not args.no_engine_api)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    try:  # uvicorn.run would pick uvloop too; vLLM's own server runs on it
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from skyrl_backends.http.engine_server import LoadingResponder, stop_on_stdin_close, write_url_file

    if args.stop_on_stdin_close:
        stop_on_stdin_close()
    from skyrl_backends.http.server import bind_socket, uvicorn_config

    # The port is bound first and answers "loading" until the engines are up (see engine_server).
    sock = bind_socket(args.host, args.port)
    loading = LoadingResponder(sock).start()
    if args.url_file:
        write_url_file(args.url_file, sock)
    try:
        client, app, name = await _serving_app(args)
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

        await uvicorn.Server(uvicorn_config(app)).serve(sockets=[sock])
    finally:
        await client.teardown()


async def _serving_app(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.config import REMOTE_FIELDS
    from skyrl_backends.http.app import create_app
    from skyrl_backends.http.engine_routes import DEFAULT_ENGINE_API_MAX_BODY_BYTES, create_engine_app
    from skyrl_backends.http.engine_server import with_engine_api
    from skyrl_backends.http.guards import DEFAULT_MAX_BODY_BYTES

    config = _generator_config(args)
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
    app = create_app(client, tokenizer, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    if not args.no_engine_api:
        app = with_engine_api(app, create_engine_app(
            engines, api_key=args.api_key,
            max_body_bytes=args.engine_api_max_body_bytes or DEFAULT_ENGINE_API_MAX_BODY_BYTES))
    return client, app, name
