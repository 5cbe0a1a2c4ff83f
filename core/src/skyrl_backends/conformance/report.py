"""The conformance report: what one run of the suite found, per test and per parity-table row.

The JSON written here is the only input of the parity table (:mod:`.parity`), so the table can only
say what a real run said. Outcomes of a test:

* ``pass``; ``fail`` (with the first line of the failure);
* ``unsupported``: skipped because the backend declares a capability absent (reason names it), or
  rejected a parameter by name (``unsupported (rejected): ...``);
* ``xfail``: a known failure listed by the backend's suite class, with its reason;
* ``skipped``: any other skip (should not happen in a complete run; shown as such).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyrl_backends.conformance.markers import REJECTED_PREFIX, UNSUPPORTED_PREFIX, merge_unsupported
from skyrl_backends.testing.hardware import cpu_model

if TYPE_CHECKING:
    import pytest

    from skyrl_backends.conformance.harness import ConformanceHarness

REPORT_FORMAT = 1


@dataclass
class CaseResult:
    nodeid: str
    test: str
    group: str
    feature: str
    # Until its result is recorded. The report is rewritten after every test, so a run that dies
    # midway says which tests it never reached instead of passing them over in silence.
    status: str = "not run"
    detail: str = "the run ended before this test"


@dataclass
class FeatureResult:
    feature: str
    status: str  # pass | fail | unsupported | xfail | partial | skipped
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def aggregate(feature: str, results: list[CaseResult]) -> FeatureResult:
    """One parity-table cell from the tests of one row."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1

    def details(status: str) -> str:
        found = list(dict.fromkeys(r.detail for r in results if r.status == status and r.detail))
        if status == "unsupported":
            declared = [d for d in found if d.startswith(UNSUPPORTED_PREFIX)]
            found = ([merge_unsupported(declared)] if declared else []) + [d for d in found if d not in declared]
        return "; ".join(found)

    if counts.get("fail"):
        return FeatureResult(feature, "fail", "; ".join(r.test for r in results if r.status == "fail"), counts)
    if counts.get("pass"):
        others = [s for s in counts if s != "pass"]
        if not others:
            return FeatureResult(feature, "pass", "", counts)
        return FeatureResult(feature, "partial", "; ".join(details(s) for s in sorted(others) if details(s)), counts)
    if counts.get("not run"):
        return FeatureResult(feature, "not run", details("not run"), counts)
    if counts.get("xfail"):
        return FeatureResult(feature, "xfail", details("xfail"), counts)
    if counts.get("unsupported"):
        return FeatureResult(feature, "unsupported", details("unsupported"), counts)
    return FeatureResult(feature, "skipped", details("skipped"), counts)


def _outcome(report: pytest.TestReport) -> tuple[str, str] | None:
    """(status, detail) for one phase's report, or None when the phase adds nothing."""
    if hasattr(report, "wasxfail"):
        if report.skipped:
            return "xfail", str(report.wasxfail).removeprefix("reason: ")
        return ("fail", f"passed, but listed as an expected failure: {report.wasxfail}") if report.failed \
            else ("pass", "")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        return "fail", message.strip().splitlines()[0][:300] if message.strip() else "failed"
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(UNSUPPORTED_PREFIX) or reason.startswith(REJECTED_PREFIX):
            return "unsupported", reason
        return "skipped", reason
    if report.when == "call":
        return "pass", ""
    return None


class ResultCollector:
    """Collects results during a session and writes the report."""

    def __init__(self) -> None:
        self.tests: dict[str, CaseResult] = {}
        self.harness: ConformanceHarness | None = None

    def register(self, item: pytest.Item) -> None:
        from skyrl_backends.conformance.suite.base import feature_of

        group, row = feature_of(item)
        self.tests[item.nodeid] = CaseResult(item.nodeid, item.name, group, row)

    def describe(self, harness: ConformanceHarness) -> None:
        self.harness = harness

    def record(self, report: pytest.TestReport) -> None:
        result = self.tests.get(report.nodeid)
        if result is None:
            return
        outcome = _outcome(report)
        if outcome is None:
            return
        status, detail = outcome
        # A later phase can only make things worse (a teardown error fails a passed test).
        if result.status == "fail" or (report.when == "teardown" and status != "fail"):
            return
        result.status, result.detail = status, detail

    def has_results(self) -> bool:
        return self.harness is not None and any(t.status != "not run" and (t.status != "skipped" or t.detail)
                                                for t in self.tests.values())

    def features(self) -> list[FeatureResult]:
        rows: dict[str, list[CaseResult]] = {}
        for result in self.tests.values():
            rows.setdefault(result.feature, []).append(result)
        return [aggregate(name, results) for name, results in rows.items()]

    def to_dict(self) -> dict[str, Any]:
        assert self.harness is not None
        return build_report(self.harness, list(self.tests.values()), self.features())

    def write(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def summary_lines(self) -> list[str]:
        return [summary_line(row.feature, row.status, row.detail) for row in self.features()]


def summary_line(feature: str, status: str, detail: str) -> str:
    """One feature's verdict as the terminal summary prints it."""
    if status == "unsupported":
        return f"{feature}: {detail}"
    extra = f" ({detail})" if detail and status != "pass" else ""
    return f"{feature}: {status}{extra}"


def build_report(harness: ConformanceHarness, tests: list[CaseResult], features: list[FeatureResult]) -> dict[str, Any]:
    backend = harness.backend
    return {
        "format": REPORT_FORMAT,
        "backend": harness.config.backend,
        "column": column_name(harness.config.backend, transport_kind(harness)),
        "transport": TRANSPORTS.get(transport_kind(harness), "in process"),
        "distribution": backend.distribution,
        "distribution_version": backend.distribution_version,
        "engine": backend.info.engine if backend.info else None,
        "engine_version": backend.engine_version,
        "hardware": hardware_description(harness),
        "dtype": harness._engine_dtype,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "engine_options": {k: repr(v) if not isinstance(v, (str, int, float, bool, type(None))) else v
                           for k, v in harness.config.engine_options.items()},
        "capabilities": {k: list(v) if isinstance(v, tuple) else v for k, v in harness.capabilities.to_dict().items()},
        "features": [asdict(f) for f in features],
        "tests": [asdict(t) for t in tests],
    }


# How a column's engines were reached, by the column's suffix.
TRANSPORTS = {"remote": "remote: skyrl-backends serve on loopback, driven by RemoteEngine over HTTP",
              "server": "server: the engine's own server (unmodified) on loopback, driven through its HTTP API"}


def transport_kind(harness: ConformanceHarness) -> str:
    if harness.config.server:
        return "server"
    return "remote" if harness.config.remote else device_kind(harness)


def column_name(backend: str, kind: str) -> str:
    return f"{backend}-{kind}"


def device_kind(harness: ConformanceHarness) -> str:
    device = str(harness.config.engine_options.get("device", "auto"))
    if device.startswith("cpu"):
        return "cpu"
    return "gpu" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def hardware_description(harness: ConformanceHarness) -> str:
    if device_kind(harness) == "gpu":
        import torch

        count = torch.cuda.device_count()
        return f"{count}x {torch.cuda.get_device_name(0)}"
    return f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} cores)"

