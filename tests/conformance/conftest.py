"""Runs the shared conformance suite against one in-repo backend, chosen with ``--backend``, in
that backend's own environment: ``pytest tests/conformance --backend transformers``.

Each backend has its own suite class (``test_<backend>.py``), where its known gaps are listed as
expected failures with reasons; classes of the other backends are deselected. With
``--conformance-remote`` every engine runs behind ``skyrl-backends serve`` and is driven over HTTP.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["skyrl_backends.conformance.pytest_plugin"]

REPORT_DIR_ENV = "SKYRL_CONFORMANCE_REPORT_DIR"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", default=None, help="the in-repo backend to run the conformance suite against")


def pytest_configure(config: pytest.Config) -> None:
    backend = config.getoption("--backend")
    if not backend:
        raise pytest.UsageError("tests/conformance needs --backend NAME (transformers, minimal, vllm, sglang)")
    config.option.conformance_backend = backend
    # Every run leaves its report where `make parity` and the CI table check look for it.
    if not config.option.conformance_report:
        directory = os.environ.get(REPORT_DIR_ENV, os.path.join(str(config.rootpath), ".cache", "conformance"))
        remote = config.option.conformance_remote or os.environ.get("SKYRL_CONFORMANCE_REMOTE", "") not in ("", "0")
        server = config.option.conformance_server or os.environ.get("SKYRL_CONFORMANCE_SERVER", "") not in ("", "0")
        suffix = "-server" if server else "-remote" if remote else ""
        config.option.conformance_report = os.path.join(directory, f"{backend}{suffix}.json")
