"""The suite's rules for backend authors, run through pytest itself (pytester): an absent capability
is reported as unsupported naming it, a standard test may only be overridden as an expected failure
with a reason, and never removed.

The backend here is a test double that only declares capabilities: none of these tests reaches an
engine (the ones that would are skipped, overridden or deselected), because what is checked is the
suite's routing of tests, not generation.
"""

from __future__ import annotations

import json
import textwrap

import pytest

# Imported here, before any in-process run: pytester drops modules first imported during a run,
# and importing torch's extension a second time crashes the interpreter.
import skyrl_backends.conformance.pytest_plugin  # noqa: F401
import skyrl_backends.conformance.standalone_suite  # noqa: F401

pytest_plugins = ["pytester"]

CONFTEST = '''
import types

from skyrl_backends import BackendInfo, Capabilities, hookimpl, register_backend

class CapabilitiesOnlyDouble:
    """Declares capabilities; starting an engine is an error (no test here may need one)."""

    @hookimpl
    def skyrl_backends_backend_info(self):
        return BackendInfo(name="capsonly", engine="pytest")

    @hookimpl
    def skyrl_backends_capabilities(self, config):
        return Capabilities(abort=True)

    @hookimpl
    def skyrl_backends_translate_sampling_params(self, params, config):
        return params

    @hookimpl
    def skyrl_backends_create_engine(self, config):
        raise AssertionError("this test double never starts an engine")

register_backend(CapabilitiesOnlyDouble(), "capsonly")
pytest_plugins = ["skyrl_backends.conformance.pytest_plugin"]
'''


@pytest.fixture
def suite_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


def run(pytester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_suite="from skyrl_backends.conformance import BackendConformanceSuite\n\n"
                        + textwrap.dedent(body))
    report = pytester.path / "report.json"
    return pytester.runpytest_inprocess("--conformance-model", str(pytester.path), "--conformance-report",
                                        str(report), "-p", "no:cacheprovider", "-p", "no:asyncio",
                                        "-W", "ignore::pytest.PytestAssertRewriteWarning", *args)


def read_report(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "report.json").read_text())


def test_absent_capability_is_unsupported_naming_it(suite_dir: pytest.Pytester) -> None:
    result = run(suite_dir, """
        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"
    """, "-k", "test_load_changes_output_unload_restores or test_sleep_wake_cycle", "-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*unsupported (declared): lora*", "*unsupported (declared): sleep*"])
    features = {f["feature"]: f for f in read_report(suite_dir)["features"]}
    assert features["LoRA"]["status"] == "unsupported"
    assert features["LoRA"]["detail"] == "unsupported (declared): lora"
    assert read_report(suite_dir)["column"] == "capsonly-cpu"


def test_override_without_xfail_fails(suite_dir: pytest.Pytester) -> None:
    result = run(suite_dir, """
        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"

            def test_max_length_is_exact(self, conformance):
                pass
    """, "-k", "test_max_length_is_exact")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*overrides a standard conformance test without an expected failure*"])


def test_override_with_xfail_reason_is_a_known_failure(suite_dir: pytest.Pytester) -> None:
    result = run(suite_dir, """
        import pytest

        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"

            @pytest.mark.xfail(reason="engine pads stop strings", strict=True)
            def test_max_length_is_exact(self, conformance):
                raise AssertionError("the backend's own version of the check fails")
    """, "-k", "test_max_length_is_exact")
    result.assert_outcomes(xfailed=1)
    row = next(f for f in read_report(suite_dir)["features"] if f["feature"] == "Generation contract")
    assert row["status"] == "xfail" and "engine pads stop strings" in row["detail"]


def test_expected_failures_are_strict(suite_dir: pytest.Pytester) -> None:
    # Listed but overridden to pass: a stale entry is reported as a failure, not kept quietly.
    result = run(suite_dir, """
        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"
            expected_failures = {"test_max_length_is_exact": "known gap"}

            def test_max_length_is_exact(self, conformance):
                pass
    """, "-k", "test_max_length_is_exact")
    result.assert_outcomes(failed=1)


def test_removing_a_standard_test_stops_the_run(suite_dir: pytest.Pytester) -> None:
    result = run(suite_dir, """
        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"
            test_max_length_is_exact = None
    """)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*removes standard conformance test(s)*test_max_length_is_exact*"])


def test_classes_of_other_backends_are_deselected(suite_dir: pytest.Pytester) -> None:
    result = run(suite_dir, """
        class TestOther(BackendConformanceSuite):
            backend = "some-other-backend"

        class TestCaps(BackendConformanceSuite):
            backend = "capsonly"
    """, "--conformance-backend", "capsonly", "-k", "test_load_changes_output_unload_restores")
    result.assert_outcomes(skipped=1)


def test_engine_options_are_read_as_every_command_reads_them(suite_dir: pytest.Pytester) -> None:
    # --conformance-engine-option takes the one KEY=VALUE format (JSON, else YAML) of `serve` and the demo.
    suite_dir.makepyfile(test_options="""
        class TestOptions:
            backend = "capsonly"

            def test_options(self, conformance_config):
                assert conformance_config.engine_options == {"rate": 0.001, "kw": {"a": 1}, "dtype": "float32"}
    """)
    result = suite_dir.runpytest_inprocess(
        "--conformance-model", str(suite_dir.path), "-p", "no:cacheprovider", "-p", "no:asyncio",
        "--conformance-engine-option", "rate=1e-3", "--conformance-engine-option", "kw={a: 1}",
        "--conformance-engine-option", "dtype=float32", "test_options.py")
    result.assert_outcomes(passed=1)
