"""The entry points a trainer calls: pick a backend by name and get an engine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from skyrl_backends.config import GeneratorConfig, load_config
from skyrl_backends.discovery import Backend, all_backends, get_backend
from skyrl_backends.engine import InferenceEngine
from skyrl_backends.errors import BackendLoadError, SkyRLBackendsError

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
    """
    if model is not None:
        options["model"] = os.fspath(model)
    if backend is not None:
        options["backend"] = backend
    cfg = load_config(config, **options)
    if cfg.model is None:
        from skyrl_backends.errors import ConfigError

        raise ConfigError("model", "no model given; pass model=PATH (a Hugging Face model folder).")
    chosen = get_backend(cfg.backend)
    hooks = chosen.manager.hook
    capabilities = hooks.skyrl_backends_capabilities(config=cfg)
    try:
        impl = hooks.skyrl_backends_create_engine(config=cfg)
    except SkyRLBackendsError:
        raise  # already says what is wrong (a bad option, a missing model folder, ...)
    except Exception as exc:
        raise BackendLoadError(cfg.backend, chosen.distribution, f"engine failed to start: {exc!r}") from exc
    if impl is None:
        raise BackendLoadError(cfg.backend, chosen.distribution, "skyrl_backends_create_engine returned None")
    return InferenceEngine(cfg.backend, impl, cfg, capabilities, hooks, distribution=chosen.distribution)


def list_backends() -> dict[str, Backend]:
    """Every installed backend (usable, skipped and broken), by name."""
    return all_backends()
