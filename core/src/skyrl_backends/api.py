"""The entry points a trainer calls: pick a backend by name and get an engine."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

from skyrl_backends.config import GeneratorConfig, load_config
from skyrl_backends.discovery import Backend, all_backends, get_backend
from skyrl_backends.engine import InferenceEngine
from skyrl_backends.errors import BackendLoadError, ConfigError, SkyRLBackendsError
from skyrl_backends.registration import check_engine_class, load_engine_class

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "transformers"


def create_engine(backend: str | None = None, model: str | os.PathLike[str] | None = None, *,
                  config: GeneratorConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                  **options: Any) -> InferenceEngine:
    """Start one engine of the named backend.

    ``config`` is a GeneratorConfig, a mapping or a YAML path (the design's ``generator:`` section);
    ``model`` and any keyword ``options`` override it. ``backend`` defaults to the config's, then to
    the embedded default (``"transformers"``)::

        engine = create_engine("transformers", model="/path/to/model", dtype="float32")
        out = await engine.generate([[1, 2, 3]], {"max_generate_length": 8, "temperature": 0})

    The engine's hooks are validated before it starts when the plugin names its engine class
    (``BackendInfo.engine_class``), and on the object it returns in any case; an engine that fails
    validation is torn down and :class:`~skyrl_backends.errors.BackendLoadError` names the plugin
    and the hook.

    With ``run_engines_locally=False`` the engine is served elsewhere: ``create_engine`` connects to
    the one server in ``remote_inference_engine_urls`` and returns a
    :class:`~skyrl_backends.remote.RemoteEngine` (several URLs: :func:`create_engines`)::

        engine = create_engine(run_engines_locally=False, remote_inference_engine_urls=["10.0.0.2:8000"])
    """
    if model is not None:
        options["model"] = os.fspath(model)
    if backend is not None:
        options["backend"] = backend
    cfg = load_config(config, **options)
    if not cfg.run_engines_locally:
        urls = _remote_urls(cfg)
        if len(urls) != 1:
            raise ConfigError("remote_inference_engine_urls", f"lists {len(urls)} engine servers; create_engine "
                                                              f"makes one engine: use create_engines(...) for all")
        return _connect(cfg, urls[0])
    _check_local(cfg)
    if cfg.model is None:
        raise ConfigError("model", "no model given; pass model=PATH (a Hugging Face model folder).")
    chosen = get_backend(cfg.backend)
    hooks = chosen.manager.hook
    capabilities = hooks.skyrl_backends_capabilities(config=cfg)
    if chosen.info is not None and chosen.info.engine_class:
        engine_class = load_engine_class(chosen.info.engine_class, cfg.backend, chosen.distribution)
        check_engine_class(engine_class, cfg.backend, capabilities, chosen.distribution)
    try:
        impl = hooks.skyrl_backends_create_engine(config=cfg)
    except SkyRLBackendsError:
        raise  # already says what is wrong (a bad option, a missing model folder, ...)
    except Exception as exc:
        raise BackendLoadError(cfg.backend, chosen.distribution, f"engine failed to start: {exc!r}") from exc
    if impl is None:
        raise BackendLoadError(cfg.backend, chosen.distribution, "skyrl_backends_create_engine returned None")
    try:
        return InferenceEngine(cfg.backend, impl, cfg, capabilities, hooks, distribution=chosen.distribution)
    except BackendLoadError:
        _tear_down_unusable(impl)
        raise


def create_engines(backend: str | None = None, model: str | os.PathLike[str] | None = None, *,
                   config: GeneratorConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                   **options: Any) -> list[Any]:
    """Every engine a generator config describes: ``num_inference_engines`` engines started here, or,
    with ``run_engines_locally=False``, one :class:`~skyrl_backends.remote.RemoteEngine` per URL of
    ``remote_inference_engine_urls`` (SkyRL's keys). Hand them to
    :class:`~skyrl_backends.client.InferenceEngineClient`, which routes, pauses and fails over both
    kinds alike::

        client = InferenceEngineClient(create_engines(config="generator.yaml"))
    """
    if model is not None:
        options["model"] = os.fspath(model)
    if backend is not None:
        options["backend"] = backend
    cfg = load_config(config, **options)
    if not cfg.run_engines_locally:
        return [_connect(cfg, url) for url in _remote_urls(cfg)]
    _check_local(cfg)
    engines: list[Any] = []
    try:
        for _ in range(cfg.num_inference_engines):
            engines.append(create_engine(config=cfg))
    except BaseException:
        for engine in engines:
            _tear_down_unusable_engine(engine)
        raise
    return engines


def _remote_urls(cfg: GeneratorConfig) -> list[str]:
    if not cfg.remote_inference_engine_urls:
        raise ConfigError("remote_inference_engine_urls", "is empty but run_engines_locally is false; list the "
                                                          "engine servers (e.g. ['10.0.0.2:8000']) or set "
                                                          "run_engines_locally: true")
    return list(cfg.remote_inference_engine_urls)


def _check_local(cfg: GeneratorConfig) -> None:
    if cfg.remote_inference_engine_urls:
        raise ConfigError("remote_inference_engine_urls", "lists engine servers but run_engines_locally is true; "
                                                          "set run_engines_locally: false to use them")


def _connect(cfg: GeneratorConfig, url: str) -> Any:
    from skyrl_backends.remote import connect_engine

    return connect_engine(url, api_key=cfg.remote_inference_engine_api_key,
                          dialect=cfg.remote_inference_engine_protocol)


def _tear_down_unusable_engine(engine: Any) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_await(engine.teardown()))
    else:
        task = asyncio.ensure_future(_await(engine.teardown()))
        _pending_teardowns.add(task)
        task.add_done_callback(_pending_teardowns.discard)


def _tear_down_unusable(impl: object) -> None:
    """Stop an engine that started but failed validation, so a rejected plugin leaks no engine.
    Its teardown may be async: inside a running loop it is scheduled there (the engine may be bound
    to that loop), otherwise run to completion here."""
    teardown = getattr(impl, "skyrl_backends_teardown", None)
    if not callable(teardown):
        return
    try:
        result = teardown()
        if inspect.isawaitable(result):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(_await(result))
            else:
                task = loop.create_task(_await(result))
                _pending_teardowns.add(task)
                task.add_done_callback(_pending_teardowns.discard)
    except Exception as exc:  # the validation error is what the caller needs to see
        logger.warning("teardown of an engine that failed validation raised %r", exc)


_pending_teardowns: set[asyncio.Task[Any]] = set()


async def _await(awaitable: Any) -> None:
    with contextlib.suppress(Exception):
        await awaitable


def list_backends() -> dict[str, Backend]:
    """Every installed backend (usable, skipped and broken), by name."""
    return all_backends()
