"""Options of the consistency measurement's pytest entry (``tests/consistency``), run in each backend's
own environment: ``pytest tests/consistency --consistency-backend vllm``."""

from __future__ import annotations

import os

import pytest

REPORT_DIR_ENV = "SKYRL_CONSISTENCY_REPORT_DIR"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("consistency", "trainer/engine log-probability consistency")
    group.addoption("--consistency-backend", default=None, help="the backend to measure (transformers, vllm, sglang)")
    group.addoption("--consistency-report-dir", default=None,
                    help=f"where reports go (default: env {REPORT_DIR_ENV}, else .cache/consistency); "
                         "`make consistency` writes the committed ones into docs/consistency. Give it as "
                         "--consistency-report-dir=DIR: pytest takes a separate existing folder for a test path")
    group.addoption("--consistency-engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine option for every column (engine_init_kwargs are merged with the column's)")
    group.addoption("--consistency-lengths", default=None, metavar="TOKENSxPROMPTS,...",
                    help="measure only these lengths of the plan (compared with the committed report's numbers "
                         "for them)")
    group.addoption("--consistency-dtype", default="bfloat16", help="the engine's (and the trainer's) dtype")


@pytest.fixture(scope="session")
def consistency_backend(request: pytest.FixtureRequest) -> str:
    backend = request.config.getoption("--consistency-backend")
    if not backend:
        raise pytest.UsageError("tests/consistency needs --consistency-backend NAME (transformers, vllm, sglang)")
    return backend


@pytest.fixture(scope="session")
def report_dir(request: pytest.FixtureRequest) -> str:
    chosen = request.config.getoption("--consistency-report-dir") or os.environ.get(REPORT_DIR_ENV)
    return chosen or os.path.join(str(request.config.rootpath), ".cache", "consistency")
