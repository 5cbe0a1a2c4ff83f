"""The conformance suite's bookkeeping: capability gating names, report aggregation, the parity
table generator and its CI check, the CLI's pytest arguments. (The suite itself runs against real
engines in tests/conformance and examples/minimal_backend.)"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
from skyrl_backends import capabilities
from skyrl_backends.capabilities import PARAMETER_REQUIREMENTS, Capabilities, missing, sleep_level, weight_sync
from skyrl_backends.conformance import parity
from skyrl_backends.conformance.cli import pytest_arguments
from skyrl_backends.conformance.markers import merge_unsupported, requires
from skyrl_backends.conformance.report import CaseResult, aggregate
from skyrl_backends.conformance.suite import GROUPS, BackendConformanceSuite, feature_rows
from skyrl_backends.conformance.suite.base import standard_tests
from skyrl_backends.sampling import SamplingParams


def result(status: str, detail: str = "", test: str = "t") -> CaseResult:
    return CaseResult(nodeid=test, test=test, group="G", feature="F", status=status, detail=detail)


def test_capability_names() -> None:
    caps = Capabilities(sleep_levels=(1,), lora=True, weight_sync_strategies=("tensors",))
    assert sleep_level(1)(caps) and not sleep_level(2)(caps)
    assert not capabilities.DISCARDS_WEIGHTS(caps)
    assert weight_sync("tensors")(caps) and not weight_sync("broadcast")(caps)
    assert capabilities.LORA(caps) and not capabilities.STOP_STRINGS(caps)
    # Requirements are typed names: a misspelling fails at import, and a bare string is refused.
    with pytest.raises(AttributeError):
        capabilities.LROA  # noqa: B018
    with pytest.raises(TypeError):
        requires("lora")


def test_missing_sleep_is_reported_as_sleep_not_each_level() -> None:
    assert missing(Capabilities(), (capabilities.SLEEP, sleep_level(2), capabilities.DISCARDS_WEIGHTS)) == ["sleep"]
    assert missing(Capabilities(sleep_levels=(1,)), (sleep_level(2),)) == ["sleep_level:2"]
    assert merge_unsupported(["unsupported (declared): a, b", "unsupported (declared): b"]) == \
        "unsupported (declared): a, b"


@pytest.mark.parametrize(("statuses", "expected"), [
    (["pass", "pass"], "pass"),
    (["pass", "fail", "unsupported"], "fail"),
    (["unsupported", "unsupported"], "unsupported"),
    (["pass", "unsupported"], "partial"),
    (["xfail", "unsupported"], "xfail"),
    (["skipped"], "skipped"),
])
def test_feature_verdict(statuses: list[str], expected: str) -> None:
    results = [result(s, "unsupported (declared): lora" if s == "unsupported" else "", f"t{i}")
               for i, s in enumerate(statuses)]
    assert aggregate("F", results).status == expected


def test_every_canonical_sampling_parameter_has_a_check() -> None:
    # A new canonical parameter must come with a conformance check that it is honoured or rejected.
    checked_by = {
        "max_generate_length": "test_max_length_is_exact", "temperature": "test_temperature_distribution",
        "top_p": "test_top_p", "top_k": "test_top_k", "min_p": "test_min_p",
        "repetition_penalty": "test_repetition_penalty", "logprobs": "test_logprobs_off_and_chosen_only",
        "stop": "test_stop_strings", "stop_token_ids": "test_stop_token_ids_end_output",
        "min_new_tokens": "test_min_new_tokens_defers_stop", "ignore_eos": "test_eos_stops_unless_ignored",
        "seed": "test_seed_reproduces", "n": "test_n_samples",
        "detokenize": "test_detokenize_off_returns_the_same_ids_without_text",
    }
    assert set(checked_by) == set(SamplingParams.field_names())
    assert set(checked_by.values()) <= set(standard_tests(BackendConformanceSuite))
    assert set(PARAMETER_REQUIREMENTS) <= set(checked_by)


def test_suite_bundles_every_group_and_rows_are_unique() -> None:
    assert set(BackendConformanceSuite.__mro__) >= set(GROUPS)
    rows = feature_rows()
    assert len(rows) == len(set(rows)) and "Lifecycle state machine" in rows
    for group in GROUPS:
        assert not group.__name__.startswith("Test"), "groups must not be collected on their own"


def report(column: str, **statuses: str) -> dict:
    return {"column": column, "backend": column.split("-")[0], "engine": "e", "engine_version": "1.0",
            "hardware": "CPU", "dtype": "float32", "date": "2026-01-01",
            "features": [{"feature": f.replace("_", " "), "status": s, "detail": "unsupported (declared): lora"
                          if s == "unsupported" else ""} for f, s in statuses.items()]}


def test_parity_table_rendering(tmp_path: Path) -> None:
    reports = [report("zeta-gpu", LoRA="pass"), report("transformers-cpu", LoRA="unsupported", Abort="fail")]
    text = parity.render(reports)
    header = next(line for line in text.splitlines() if line.startswith("| Feature"))
    assert header.index("transformers-cpu") < header.index("zeta-gpu"), "preferred columns come first"
    lora = next(line for line in text.splitlines() if line.startswith("| LoRA |"))
    assert lora == "| LoRA | unsupported (declared): lora | pass |"
    assert "| Abort | **fail** | not run |" in text
    assert "| *Engine* | e 1.0 | e 1.0 |" in text


def test_parity_check(tmp_path: Path) -> None:
    committed = [report("transformers-cpu", LoRA="pass", Abort="pass"), report("vllm-gpu", LoRA="pass")]
    table = tmp_path / "parity.md"
    table.write_text(parity.render(committed))
    fresh = copy.deepcopy(committed[0])
    fresh["date"], fresh["hardware"] = "2030-01-01", "another CPU"  # metadata may differ
    assert parity.check(table, committed, [fresh]) == []
    fresh["features"][1]["status"] = "fail"
    problems = parity.check(table, committed, [fresh])
    assert len(problems) == 1 and "transformers-cpu / Abort" in problems[0]
    table.write_text(table.read_text().replace("| pass |", "| fail |", 1))
    assert any("not what its reports generate" in p for p in parity.check(table, committed, []))
    assert "has no committed report" in parity.check(table, committed, [report("sglang-gpu", LoRA="pass")])[-1]


def test_parity_reports_must_be_unique(tmp_path: Path) -> None:
    import json

    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(report("transformers-cpu", LoRA="pass")))
    with pytest.raises(ValueError, match="several reports") as refused:
        parity.load_reports([tmp_path / "a.json", tmp_path / "b.json"])
    assert str(tmp_path / "a.json") in str(refused.value) and str(tmp_path / "b.json") in str(refused.value)


def test_cli_runs_the_shipped_suite_module() -> None:
    args = argparse.Namespace(backend="minimal", model="m", report="r.json", engine_option=["dtype=float32"],
                              keyword="logprobs", pytest_args="-x")
    argv = pytest_arguments(args)
    assert argv[0].endswith("skyrl_backends/conformance/standalone_suite.py")
    assert ["-p", "skyrl_backends.conformance.pytest_plugin"] == argv[1:3]
    assert "--conformance-backend" in argv and "minimal" in argv
    assert argv[-3:] == ["-k", "logprobs", "-x"]


def test_a_parameter_may_be_rejected_by_name_but_not_ignored() -> None:
    from skyrl_backends.conformance.suite.base import honoured_or_rejected
    from skyrl_backends.errors import SamplingParamsError

    with pytest.raises(pytest.skip.Exception, match=r"unsupported \(rejected\): top_p"):
        with honoured_or_rejected("top_p"):
            raise SamplingParamsError("top_p", "not on this engine")
    with pytest.raises(SamplingParamsError):  # rejected under another parameter's name: a real error
        with honoured_or_rejected("top_p"):
            raise SamplingParamsError("top_k", "not on this engine")
