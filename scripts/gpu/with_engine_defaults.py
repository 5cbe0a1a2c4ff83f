"""Run a Python script (or ``-m module``) with default engine options for every engine it creates.

Some benchmarks and tests start engines without a way to pass engine options
(``core/benchmarks/bench_weight_sync.py``, ``tests/weight_sync/test_gpu.py``), yet the GPU machine
needs a few: the SGLang build that travels there leaves out its default attention kernels (FA3), so
SGLang must be told to use Triton's. Defaults come per backend as JSON in ``SKYRL_ENGINE_DEFAULTS``;
options the caller passes win, and ``engine_init_kwargs`` are merged key by key::

    SKYRL_ENGINE_DEFAULTS='{"sglang": {"engine_init_kwargs": {"attention_backend": "triton"}}}' \\
        python scripts/gpu/with_engine_defaults.py core/benchmarks/bench_weight_sync.py --mode gpu --engine sglang
    python scripts/gpu/with_engine_defaults.py -m pytest -q tests/weight_sync/test_gpu.py
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
from collections.abc import Callable
from typing import Any

DEFAULTS_ENV = "SKYRL_ENGINE_DEFAULTS"


def merged_options(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **options}
    if "engine_init_kwargs" in defaults:
        merged["engine_init_kwargs"] = {**defaults["engine_init_kwargs"], **(options.get("engine_init_kwargs") or {})}
    return merged


def with_defaults(create_engine: Callable[..., Any], per_backend: dict[str, dict[str, Any]]) -> Callable[..., Any]:
    @functools.wraps(create_engine)
    def create(backend: str | None = None, model: Any = None, **options: Any) -> Any:
        defaults = per_backend.get(backend or options.get("backend") or "", {})
        return create_engine(backend, model, **merged_options(defaults, options))

    return create


def install(per_backend: dict[str, dict[str, Any]]) -> None:
    """Patch ``skyrl_backends.create_engine`` (and the api module's) before the target imports it."""
    import skyrl_backends
    import skyrl_backends.api

    patched = with_defaults(skyrl_backends.api.create_engine, per_backend)
    skyrl_backends.create_engine = skyrl_backends.api.create_engine = patched


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    install(json.loads(os.environ.get(DEFAULTS_ENV) or "{}"))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
