"""The pytest plugin that switches the conformance suite on.

It is never loaded by itself (no ``pytest11`` entry point): a test suite opts in from its
``conftest.py``::

    pytest_plugins = ["skyrl_backends.conformance.pytest_plugin"]

and a test module subclasses :class:`skyrl_backends.conformance.BackendConformanceSuite`. The
plugin adds the options below, the fixtures the suite needs (``conformance_config`` and
``conformance``), the capability skips, the expected-failure rules and the JSON report.
"""

# ruff: noqa: E402  (the suite is imported after its asserts are registered for rewriting)
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest

# Before the suite is imported, so its asserts report the values they compared. (When something
# imported the suite first, its asserts still work, only without the values: nothing to warn about.)
_REWRITTEN = [m for m in ("skyrl_backends.conformance.suite", "skyrl_backends.conformance.harness")
              if m not in sys.modules]
if _REWRITTEN:
    pytest.register_assert_rewrite(*_REWRITTEN)

from skyrl_backends.conformance.config import ConformanceConfig
from skyrl_backends.conformance.harness import ConformanceHarness, new_event_loop
from skyrl_backends.conformance.report import ResultCollector
from skyrl_backends.conformance.suite.base import FAILED_KEY, ConformanceTestBase, standard_tests
from skyrl_backends.engine_options import HELP as ENGINE_OPTION_HELP
from skyrl_backends.engine_options import parse_engine_options
from skyrl_backends.errors import ConfigError
from skyrl_backends.testing.cache import CACHE_ENV, cache_dir

BACKEND_ENV = "SKYRL_CONFORMANCE_BACKEND"
MODEL_ENV = "SKYRL_CONFORMANCE_MODEL"
REPORT_ENV = "SKYRL_CONFORMANCE_REPORT"
REMOTE_ENV = "SKYRL_CONFORMANCE_REMOTE"
SERVER_ENV = "SKYRL_CONFORMANCE_SERVER"
TEST_MODEL_ENV = "SKYRL_TEST_MODEL"
MODEL_CACHE_ENV = CACHE_ENV

_COLLECTOR = pytest.StashKey[ResultCollector]()
_HARNESSES = pytest.StashKey[dict]()
_LOOP = pytest.StashKey[asyncio.AbstractEventLoop]()
_OVERRIDE = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("skyrl-backends conformance")
    group.addoption("--conformance-backend", default=None,
                    help=f"backend to test (overrides the suite class's `backend`; env {BACKEND_ENV}). "
                         "Suite classes written for another backend are deselected.")
    group.addoption("--conformance-model", default=None,
                    help=f"model folder (env {MODEL_ENV} or {TEST_MODEL_ENV}; default: the tiny test model, "
                         "built offline on first use)")
    group.addoption("--conformance-engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help=f"extra create_engine option: {ENGINE_OPTION_HELP}")
    group.addoption("--conformance-remote", action="store_true", default=None,
                    help=f"run every engine through the wire: a `skyrl-backends serve` process on loopback driven by "
                         f"a RemoteEngine (env {REMOTE_ENV}=1); the report's column is <backend>-remote")
    group.addoption("--conformance-server", action="store_true", default=None,
                    help=f"run every engine as the engine's own, unmodified server (vllm serve, SGLang's "
                         f"launch_server) driven through its HTTP API (env {SERVER_ENV}=1); the report's column "
                         f"is <backend>-server")
    group.addoption("--conformance-report", default=None, metavar="FILE",
                    help=f"write the JSON report (per test and per parity-table feature) here (env {REPORT_ENV})")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COLLECTOR] = ResultCollector()
    config.stash[_HARNESSES] = {}
    config.pluginmanager.register(_ReportingPlugin(config), "skyrl-backends-conformance-report")


def pytest_unconfigure(config: pytest.Config) -> None:
    harnesses: dict = config.stash.get(_HARNESSES, {})
    for harness in harnesses.values():
        harness.close()
    loop = config.stash.get(_LOOP, None)
    if loop is not None and not loop.is_closed():
        loop.close()


# -- configuration ---------------------------------------------------------------------------------
def selected_backend(config: pytest.Config) -> str | None:
    return config.getoption("--conformance-backend") or os.environ.get(BACKEND_ENV) or None


def resolve_config(config: pytest.Config, cls: type) -> ConformanceConfig:
    """The configuration of one suite class: command line and environment over class attributes."""
    backend = selected_backend(config) or getattr(cls, "backend", None)
    if not backend:
        raise pytest.UsageError(
            f"{cls.__name__}: no backend to test. Set `backend = \"NAME\"` on the class or pass "
            f"--conformance-backend NAME.")
    model = (config.getoption("--conformance-model") or os.environ.get(MODEL_ENV) or getattr(cls, "model", None)
             or os.environ.get(TEST_MODEL_ENV) or None)
    options = dict(getattr(cls, "engine_options", None) or {})
    try:
        options.update(parse_engine_options(config.getoption("--conformance-engine-option"),
                                            "--conformance-engine-option"))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    overrides = dict(getattr(cls, "conformance_overrides", None) or {})
    remote = bool(config.getoption("--conformance-remote") or os.environ.get(REMOTE_ENV, "") not in ("", "0"))
    server = bool(config.getoption("--conformance-server") or os.environ.get(SERVER_ENV, "") not in ("", "0"))
    if remote and server:
        raise pytest.UsageError("--conformance-remote and --conformance-server exclude each other: the first serves "
                                "engines with `skyrl-backends serve`, the second with the engine's own server")
    return ConformanceConfig(backend=backend, model=model, engine_options=options, remote=remote, server=server,
                             **overrides)


def default_model_dir() -> str:
    """The suite's own tiny model, built once per machine (offline, deterministic)."""
    from skyrl_backends.testing.tiny_model import build_tiny_model

    return str(build_tiny_model(cache_dir("tiny-model")))


def _loop(config: pytest.Config) -> asyncio.AbstractEventLoop:
    if _LOOP not in config.stash:
        config.stash[_LOOP] = new_event_loop()
    return config.stash[_LOOP]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def conformance_config(request: pytest.FixtureRequest) -> ConformanceConfig:
    """The backend, model and engine options under test (override this fixture to compute them)."""
    cfg = resolve_config(request.config, request.cls)
    if cfg.model is None:
        cfg = cfg.replace(model=default_model_dir())
    return cfg


@pytest.fixture(scope="class")
def conformance(request: pytest.FixtureRequest, conformance_config: ConformanceConfig) -> ConformanceHarness:
    """The harness: shared engine, fresh engines, the reference oracle and helpers."""
    harnesses: dict = request.config.stash[_HARNESSES]
    key = conformance_config.key()
    if key not in harnesses:
        # One live configuration at a time: engines of another one are stopped first.
        for other in harnesses.values():
            other.discard_shared()
        harnesses[key] = ConformanceHarness(conformance_config, _loop(request.config))
    harness = harnesses[key]
    request.config.stash[_COLLECTOR].describe(harness)
    return harness


# -- collection: selection, expected failures, the override rule -----------------------------------
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = selected_backend(config)
    keep, deselected = [], []
    checked_classes: set[type] = set()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or not issubclass(cls, ConformanceTestBase):
            keep.append(item)
            continue
        own = getattr(cls, "backend", None)
        if selected and own and own != selected:
            deselected.append(item)
            continue
        if cls not in checked_classes:
            checked_classes.add(cls)
            _check_removed_tests(cls)
        _apply_expected_failure(item, cls)
        keep.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = _in_suite_order(keep)


def _in_suite_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """Conformance tests in the order of the suite's groups and of tests within each group (pytest
    would otherwise start with the last base class); other tests keep their places."""
    from skyrl_backends.conformance.suite import GROUPS
    from skyrl_backends.conformance.suite.base import defining_group

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = getattr(item, "originalname", item.name)
        group = defining_group(item.cls, name)
        if group not in GROUPS:
            return (len(GROUPS), 0)
        return (GROUPS.index(group), list(vars(group)).index(name))

    positions = [i for i, item in enumerate(items)
                 if getattr(item, "cls", None) is not None and issubclass(item.cls, ConformanceTestBase)]
    ordered = sorted((items[i] for i in positions), key=rank)
    result = list(items)
    for i, item in zip(positions, ordered, strict=True):
        result[i] = item
    return result


def _check_removed_tests(cls: type) -> None:
    removed = [name for name in standard_tests(cls) if not callable(getattr(cls, name, None))]
    if removed:
        raise pytest.UsageError(
            f"{cls.__name__} removes standard conformance test(s) {removed}. Keep them and add them to "
            f"`expected_failures` with a reason (or override them with @pytest.mark.xfail(reason=...)).")


def _apply_expected_failure(item: pytest.Item, cls: type) -> None:
    name = getattr(item, "originalname", item.name)
    expected = dict(getattr(cls, "expected_failures", None) or {})
    reason = expected.get(item.name, expected.get(name))
    if reason is not None:
        if not str(reason).strip():
            raise pytest.UsageError(f"{cls.__name__}.expected_failures[{name!r}] needs a reason")
        item.add_marker(pytest.mark.xfail(reason=str(reason), strict=True))
        return
    standard = standard_tests(cls).get(name)
    if standard is None:
        return
    function = getattr(item, "function", None)
    if function is not None and getattr(function, "__func__", function) is not standard:
        mark = item.get_closest_marker("xfail")
        if mark is None or not (mark.kwargs.get("reason") or (mark.args[1:] if len(mark.args) > 1 else None)):
            item.stash[_OVERRIDE] = (
                f"{cls.__name__}.{name} overrides a standard conformance test without an expected failure. "
                f"Mark the override @pytest.mark.xfail(reason=...) or list it in `expected_failures`.")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    # In place of the override's body: the test fails, and says why.
    message = pyfuncitem.stash.get(_OVERRIDE, None)
    if message:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    # Remembered so the shared-engine guard can replace an engine a failing test may have broken.
    report = yield
    if report.failed:
        item.stash[FAILED_KEY] = True
    return report


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0] if text.strip() else "failed"


class _ReportingPlugin:
    """Per-session hooks that need the collector (registered in pytest_configure)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # After every deselection (-k, -m, other backends): the report covers what actually runs.
        for item in session.items:
            cls = getattr(item, "cls", None)
            if cls is not None and issubclass(cls, ConformanceTestBase):
                self.config.stash[_COLLECTOR].register(item)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        collector = self.config.stash[_COLLECTOR]
        collector.record(report)
        if report.when == "teardown":
            # Kept current after every test: an engine that takes the run down with it (SGLang kills
            # its process group when its scheduler dies) leaves the report of everything before.
            self._write_report()
        if report.failed:
            # Said at once, not only in the summary at the end, which a killed run never prints.
            terminal = self.config.pluginmanager.get_plugin("terminalreporter")
            if terminal is not None:
                terminal.write_line(f"\nFAILED {report.nodeid} ({report.when}): {_first_line(report)}", red=True)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._write_report()

    def _write_report(self) -> None:
        collector = self.config.stash[_COLLECTOR]
        path = self.config.getoption("--conformance-report") or os.environ.get(REPORT_ENV)
        if path and collector.has_results():
            collector.write(path)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        collector = self.config.stash[_COLLECTOR]
        if not collector.has_results():
            return
        terminalreporter.section("skyrl-backends conformance")
        for line in collector.summary_lines():
            terminalreporter.write_line(line)
