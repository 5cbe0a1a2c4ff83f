"""The consistency measurement against each in-repo backend: one test per column of
``docs/consistency.md``, run in that backend's environment::

    pytest tests/consistency --consistency-backend transformers          # every column of the backend
    pytest tests/consistency --consistency-backend vllm -k "not fp32_head"

Each test generates the fixed rollouts, recomputes their log-probabilities as a trainer would, writes
the column's report (``.cache/consistency/<column>.json`` unless told otherwise), checks that the
engine's log-probabilities are the model's raw ones, and holds the report against the committed one
in ``docs/consistency/`` when there is one (rules in ``skyrl_backends.consistency.report``).

The columns below are where each backend's numerics options are written down: an fp32 LM head where
the engine has one, batch-invariant kernels where the engine has them (GPU only: vLLM's
``VLLM_BATCH_INVARIANT`` and SGLang's deterministic inference replace CUDA kernels).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from skyrl_backends.conformance.config import DEFAULT_LOGPROB_TOLERANCE
from skyrl_backends.consistency.cli import parse_engine_options
from skyrl_backends.consistency.plan import DEFAULT_PLAN, parse_lengths
from skyrl_backends.consistency.report import compare, incomparable, load_reports
from skyrl_backends.testing.tiny_model import resolve_test_model

COMMITTED_DIR = Path(__file__).resolve().parents[2] / "docs" / "consistency"


@dataclass(frozen=True)
class Column:
    label: str = ""
    engine_init_kwargs: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    trainer_lm_head: str = "model"
    gpu_only: bool = False


FP32_HEAD = "fp32-head"
COLUMNS: dict[str, list[Column]] = {
    "transformers": [
        Column(),
        Column(FP32_HEAD, {"lm_head_dtype": "float32"}, trainer_lm_head="float32"),
    ],
    "vllm": [
        Column(),
        Column(FP32_HEAD, {"hf_overrides": {"head_dtype": "float32"}}, trainer_lm_head="float32"),
        Column("batch-invariant", environment={"VLLM_BATCH_INVARIANT": "1"}, gpu_only=True),
    ],
    "sglang": [
        Column(),
        Column(FP32_HEAD, {"enable_fp32_lm_head": True}, trainer_lm_head="float32"),
        Column("deterministic", {"enable_deterministic_inference": True}, gpu_only=True),
    ],
}
# SGLang's plugin samples seeded requests itself and rescores their log-probabilities with a
# prefill; unseeded requests go through SGLang's own sampler, as a trainer's do.
UNSEEDED = {"sglang"}
# Options for a machine without CUDA (vLLM finds its CPU build by itself).
CPU_OPTIONS: dict[str, dict[str, Any]] = {"transformers": {"device": "cpu"}, "sglang": {"device": "cpu"}}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "column" in metafunc.fixturenames:
        backend = metafunc.config.getoption("--consistency-backend")
        columns = COLUMNS.get(backend or "", [])
        metafunc.parametrize("column", columns, ids=[(c.label or "default").replace("-", "_") for c in columns])


def _engine_options(request: pytest.FixtureRequest, backend: str, column: Column) -> dict[str, Any]:
    options: dict[str, Any] = {} if _cuda() else dict(CPU_OPTIONS.get(backend, {}))
    given = parse_engine_options(request.config.getoption("--consistency-engine-option"))
    init = {**(given.pop("engine_init_kwargs", None) or {}), **column.engine_init_kwargs}
    options.update(given)
    if init:
        options["engine_init_kwargs"] = init
    return options


def test_column(request: pytest.FixtureRequest, consistency_backend: str, report_dir: str, column: Column,
                monkeypatch: pytest.MonkeyPatch) -> None:
    from skyrl_backends.consistency.runner import RunConfig, run

    if column.gpu_only and not _cuda():
        pytest.skip(f"{column.label}: the engine's option replaces GPU kernels; measured on the GPU machine")
    model = resolve_test_model()
    if model is None:
        pytest.skip("no test model: set SKYRL_TEST_MODEL (make sets it), or build one with "
                    "`skyrl-backends make-tiny-model DIR`")
    for key, value in column.environment.items():
        monkeypatch.setenv(key, value)
    plan = dataclasses.replace(DEFAULT_PLAN, seeded=consistency_backend not in UNSEEDED)
    lengths = request.config.getoption("--consistency-lengths")
    if lengths:
        plan = dataclasses.replace(plan, lengths=parse_lengths(lengths))
    dtype = request.config.getoption("--consistency-dtype")
    config = RunConfig(backend=consistency_backend, model=model, dtype=dtype,
                       engine_options=_engine_options(request, consistency_backend, column),
                       trainer_lm_head=column.trainer_lm_head, label=column.label, plan=plan)
    report = asyncio.run(run(config))
    target = Path(report_dir) / f"{report['column']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")

    assert report["rollouts"]["tokens"] == plan.total_tokens
    # Raw log-probabilities: at temperature 0.7 processed ones would be far off the float32 model in
    # every dtype; the bound is the conformance suite's, for a mean over many tokens.
    bound = 0.4 * DEFAULT_LOGPROB_TOLERANCE[report["dtype"]]
    for setting, metrics in report["against"]["float32"]["by_setting"].items():
        assert metrics["mean_abs_delta"] < bound, (
            f"{report['column']}, {setting}: mean |engine - float32| = {metrics['mean_abs_delta']:.3g} "
            f"exceeds {bound:.3g}; are these log-probabilities raw?")

    committed = COMMITTED_DIR / target.name
    if committed.exists() and committed.resolve() != target.resolve():
        kept = load_reports([committed])[0]
        reason = incomparable(kept, report)
        if reason is not None:
            pytest.skip(f"measured (the checks above passed); not held against the committed report: {reason}")
        problems = compare(kept, report)
        assert not problems, "\n".join(problems)

