"""The consistency report's comparison rules, the plan's seeds, and the generated table."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from skyrl_backends.consistency.plan import DEFAULT_PLAN, Length, parse_lengths
from skyrl_backends.consistency.report import column_name, compare, load_reports
from skyrl_backends.consistency.table import BEGIN, END, check, main, render, write
from skyrl_backends.errors import ConfigError


def metrics(scale: float) -> dict[str, Any]:
    return {"sequences": 4, "tokens": 100, "mean_abs_delta": 0.01 * scale, "max_abs_delta": 0.1 * scale,
            "mean_delta": 0.001 * scale, "k3_kl": 1e-4 * scale, "frac_over_threshold": 0.02 * scale,
            "threshold": 0.1,
            "sequence_ratio": {"min": 0.5, "p05": 0.6, "p25": 0.9, "p50": 1.0, "p75": 1.1, "p95": 1.5, "max": 2.0}}


def report(column_backend: str = "vllm", label: str = "", scale: float = 1.0, print_: str = "abc",
           lengths: tuple[int, ...] = (32, 1000), engine_version: str = "0.32.0") -> dict[str, Any]:
    plan = DEFAULT_PLAN.to_dict()
    plan["lengths"] = [{"tokens": n, "prompts": 2} for n in lengths]
    against = {}
    for reference in ("trainer", "float32"):
        m = metrics(scale)
        m["by_setting"] = {"t1.0": metrics(scale), "t0.7-p0.9": metrics(scale)}
        m["by_length"] = {str(n): metrics(scale) for n in lengths}
        against[reference] = m
    return {"format": 1, "column": column_name(column_backend, "cpu", "bfloat16", label), "backend": column_backend,
            "label": label, "engine": column_backend, "engine_version": engine_version, "dtype": "bfloat16",
            "engine_options": {}, "environment": {}, "model": {"name": "tiny-model", "weights": "0123abcd"},
            "hardware": "CPU: test (2 cores)", "date": "2026-12-03",
            "trainer": {"dtype": "bfloat16", "lm_head": "model", "device": "cpu", "torch": "2.13.0",
                        "transformers": "5.0"},
            "plan": plan, "rollouts": {"sequences": 8, "tokens": 400, "fingerprint": {"all": print_, **{
                str(n): f"{print_}-{n}" for n in lengths}}, "generate_seconds": 1.0},
            "against": against}


# -- naming and the plan ------------------------------------------------------------------------------

def test_column_names() -> None:
    assert column_name("vllm", "gpu", "bfloat16") == "vllm-gpu-bf16"
    assert column_name("sglang", "gpu", "bfloat16", "fp32-head") == "sglang-gpu-bf16-fp32-head"
    assert column_name("transformers", "cpu", "float32") == "transformers-cpu-fp32"


def test_request_seeds_do_not_depend_on_what_else_the_plan_holds() -> None:
    full = DEFAULT_PLAN
    short = dataclasses.replace(full, lengths=(Length(32, 8),), settings=full.settings[1:])
    setting, length = full.settings[1], full.lengths[0]
    assert full.request_seed(setting, length, 3) == short.request_seed(setting, length, 3)
    seeds = {full.request_seed(s, n, i) for s, n in full.requests() for i in range(n.prompts)}
    assert len(seeds) == sum(n.prompts for n in full.lengths) * len(full.settings)  # all different
    assert dataclasses.replace(full, seeded=False).request_seed(setting, length, 0) is None


def test_plan_fits_the_model_and_parses_lengths() -> None:
    DEFAULT_PLAN.check_fits(1024)  # the tiny model's context
    with pytest.raises(ConfigError, match="lengths"):
        DEFAULT_PLAN.check_fits(DEFAULT_PLAN.max_sequence + 1)  # engines keep two positions
    assert max(n.tokens for n in DEFAULT_PLAN.lengths) >= 1000
    assert DEFAULT_PLAN.total_tokens == 2 * (32 * 8 + 256 * 4 + 1000 * 2)
    with pytest.raises(ConfigError, match="lengths"):
        DEFAULT_PLAN.check_fits(512)
    assert parse_lengths("32x8, 256") == (Length(32, 8), Length(256, 1))
    for bad in ("32y8", "0x2", "x"):
        with pytest.raises(ConfigError, match="lengths"):
            parse_lengths(bad)


# -- comparing a fresh report with the committed one ------------------------------------------------------

def test_an_identical_run_agrees() -> None:
    assert compare(report(), report()) == []


def test_same_rollouts_must_reproduce_the_numbers() -> None:
    problems = compare(report(), report(scale=1.01))
    assert problems and all("same rollouts" in p for p in problems)
    assert compare(report(), report(scale=1.0001)) == []


def test_diverged_rollouts_are_held_to_bands() -> None:
    assert compare(report(), report(scale=2.5, print_="other")) == []
    problems = compare(report(), report(scale=4.0, print_="other"))
    assert any("mean_abs_delta" in p and "rollouts differ" in p for p in problems)


def test_sequence_ratio_may_move_by_twice_the_committed_width() -> None:
    fresh = report(print_="other")
    # the committed ratios span log(2.0 / 0.5) = 1.39 in log space; twice that is 2.77
    fresh["against"]["float32"]["sequence_ratio"]["p50"] = 15.0  # moved by log 15 = 2.71: within
    assert compare(report(), fresh) == []
    fresh["against"]["float32"]["sequence_ratio"]["p50"] = 17.0  # moved by log 17 = 2.83: beyond
    assert any("sequence ratio p50" in p for p in compare(report(), fresh))


def test_share_over_the_threshold_allows_sampling_noise() -> None:
    # 100 tokens, band 4 * sqrt(s * (1 - s) / 100) + 3 / 100 with s the larger share
    fresh = report(print_="other")
    fresh["against"]["trainer"]["frac_over_threshold"] = 0.13  # from 0.02: 0.11 apart, band 0.165
    assert compare(report(), fresh) == []
    fresh["against"]["trainer"]["frac_over_threshold"] = 0.30  # 0.28 apart, band 0.213
    assert any("frac_over_threshold" in p for p in compare(report(), fresh))


def test_what_the_column_is_must_match_exactly() -> None:
    fresh = report()
    fresh["trainer"]["lm_head"] = "float32"
    assert any("trainer_lm_head" in p for p in compare(report(), fresh))
    fresh = report()
    fresh["plan"]["seeded"] = False
    assert any("plan" in p for p in compare(report(), fresh))
    fresh = report()
    fresh["model"]["weights"] = "ffff0000"
    assert any("model_weights" in p for p in compare(report(), fresh))


def test_a_run_of_fewer_lengths_is_held_against_those_lengths() -> None:
    committed = report(lengths=(32, 1000))
    fresh = report(lengths=(32,))
    assert compare(committed, fresh) == []
    fresh["against"]["trainer"]["by_length"]["32"]["mean_abs_delta"] *= 2
    assert any("length 32" in p for p in compare(committed, fresh))
    assert any("lengths" in p for p in compare(committed, report(lengths=(64,))))


def test_a_new_engine_version_is_named_when_numbers_change() -> None:
    problems = compare(report(), report(scale=10, engine_version="0.33.0"))
    assert "0.32.0 to 0.33.0" in problems[-1]
    assert compare(report(), report(engine_version="0.33.0")) == []


# -- the table ------------------------------------------------------------------------------------------

def test_render_orders_columns_and_formats_numbers() -> None:
    reports = [report("sglang"), report("vllm", "fp32-head"), report("vllm"), report("transformers")]
    text = render(reports)
    header = next(line for line in text.splitlines() if line.startswith("| |"))
    assert header == ("| | `transformers-cpu-bf16` | `vllm-cpu-bf16` | `vllm-cpu-bf16-fp32-head` | "
                      "`sglang-cpu-bf16` |")
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "| mean \\|Δ\\| | 0.01 | 0.01 | 0.01 | 0.01 |" in text
    assert "| tokens with \\|Δ\\| > 0.1 | 2% | 2% | 2% | 2% |" in text
    assert "| k3 KL(engine ‖ reference) per token | 1.0e-04 |" in text
    assert "0.5 / 2 (1000 tokens)" in text


def write_doc(tmp_path: Path, reports: list[dict[str, Any]]) -> Path:
    doc = tmp_path / "consistency.md"
    doc.write_text(f"# Title\n\nprose before\n\n{BEGIN}\nold\n{END}\n\nprose after\n")
    write(doc, reports)
    return doc


def test_write_keeps_the_prose_and_check_accepts_it(tmp_path: Path) -> None:
    reports = [report()]
    doc = write_doc(tmp_path, reports)
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose before\n\n" + BEGIN) and text.endswith(END + "\n\nprose after\n")
    assert "old" not in text
    assert check(doc, reports, [report()]) == []


def test_check_finds_a_hand_edit_and_an_uncommitted_column(tmp_path: Path) -> None:
    reports = [report()]
    doc = write_doc(tmp_path, reports)
    doc.write_text(doc.read_text().replace("0.01", "0.02", 1))
    problems = check(doc, reports, [report("sglang")])
    assert any("not what its reports generate" in p for p in problems)
    assert any("'sglang-cpu-bf16' was measured but has no committed report" in p for p in problems)


def test_check_needs_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "consistency.md"
    doc.write_text("# no table\n")
    assert "needs the lines" in check(doc, [report()], [])[0]


def test_reports_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"column": "x"}')
    with pytest.raises(ValueError, match="not a consistency report"):
        load_reports([path])
    good = tmp_path / "b.json"
    import json

    good.write_text(json.dumps(report()))
    with pytest.raises(ValueError, match="several reports"):
        load_reports([good, good])


def test_command_line_generate_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    committed = tmp_path / "vllm-cpu-bf16.json"
    committed.write_text(json.dumps(report()))
    doc = tmp_path / "doc.md"
    doc.write_text(f"{BEGIN}\n{END}\n")
    assert main(["generate", str(committed), "-o", str(doc)]) == 0
    fresh = tmp_path / "fresh.json"
    changed = copy.deepcopy(report(scale=2.0))
    fresh.write_text(json.dumps(changed))
    assert main(["check", str(doc), str(committed)]) == 0
    assert main(["check", str(doc), str(committed), "--fresh", str(fresh)]) == 1
    assert "mean_abs_delta" in capsys.readouterr().err


def test_cpu_reports_of_different_vector_instruction_sets_are_not_held_against_each_other():
    from skyrl_backends.consistency.report import incomparable

    committed, fresh = report(), report(scale=1.5)
    assert incomparable(committed, fresh) is None and compare(committed, fresh)  # no ISA named: compared
    committed["cpu_isa"], fresh["cpu_isa"] = "avx512_bf16", "avx2"
    reason = incomparable(committed, fresh)
    assert reason is not None and "avx512_bf16" in reason and "avx2" in reason
    fresh["cpu_isa"] = "avx512_bf16"
    assert incomparable(committed, fresh) is None and compare(committed, fresh)  # same ISA: compared


def test_the_table_check_leaves_a_column_measured_on_another_cpu_kind_alone(tmp_path):
    committed, fresh = report(), report(scale=1.5)
    committed["cpu_isa"], fresh["cpu_isa"] = "avx512_bf16", "avx2"
    document = tmp_path / "consistency.md"
    document.write_text(f"# Consistency\n\n{BEGIN}\n{END}\n")
    write(document, [committed])
    assert check(document, [committed], [fresh]) == []
    fresh["cpu_isa"] = "avx512_bf16"
    assert check(document, [committed], [fresh])  # the same kind: the numbers must agree
