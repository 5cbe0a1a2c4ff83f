"""The arithmetic of the RL-step benchmark (benchmarks/bench_step.py, issue 23's P8): which steps
pair up, the ratios it prints, and the learning line that tells a collapsed policy from a learning
one. The benchmark itself needs an engine with its own calls (vLLM or SGLang) and is run by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(side: str, step_s: float, warmup: bool = False, reward: float = 0.0, entropy: float = 6.0) -> dict:
    return {"side": side, "warmup": warmup, "step_s": step_s, "update_s": step_s / 2, "reward_mean": reward,
            "exact_rate": reward, "entropy": entropy}


def test_warmup_steps_are_left_out_and_each_pair_holds_one_step_of_each_side(bench_step):
    rows = [_row("skyrl", 9.0, warmup=True), _row("own", 9.0, warmup=True),
            _row("skyrl", 1.0), _row("own", 2.0),      # pair order alternates...
            _row("own", 4.0), _row("skyrl", 2.0)]      # ...so each side goes first half the time
    pairs = bench_step.pairs_of(rows)
    assert [(p["skyrl"]["step_s"], p["own"]["step_s"]) for p in pairs] == [(1.0, 2.0), (2.0, 4.0)]


def test_the_table_gives_medians_and_the_median_of_paired_ratios(bench_step):
    pairs = [{"skyrl": _row("skyrl", s), "own": _row("own", o)} for s, o in ((1.0, 2.0), (3.0, 2.0), (2.0, 4.0))]
    step = next(line for line in bench_step.table(pairs) if line.startswith("step"))
    # medians 2.0 / 2.0 = 1.000; pairs 0.5, 1.5, 0.5 -> median 0.5
    assert step.split()[1:] == ["2000.0", "2000.0", "1.000", "0.500"]


def test_the_learning_line_shows_a_collapse_as_entropy_near_zero(bench_step):
    collapsed = [_row("skyrl", 1.0, reward=0.0 if i < 10 else 0.33, entropy=5.9 if i < 2 else 0.0) for i in range(20)]
    line = bench_step.learning(collapsed)
    assert "first 10 steps 0.000, last 10 steps 0.330" in line
    assert line.endswith("policy entropy 1.18 -> 0.00 nats")  # (2 x 5.9) / 10 over the first window


def test_a_run_stopped_within_its_warmup_says_so_instead_of_failing(bench_step):
    # The JSON is rewritten after every pair, so a run cut short by its time limit can be pooled or
    # printed with no counted pair yet.
    pairs = bench_step.pairs_of([_row("skyrl", 9.0, warmup=True), _row("own", 9.0, warmup=True)])
    assert pairs == []
    assert bench_step.table(pairs) == ["no counted pairs (the run stopped within its warm-up)"]


def test_pooling_prints_each_calls_own_step_ratio_beside_the_pooled_one(bench_step, tmp_path, capsys):
    # Two calls on machines of different speeds, skyrl quicker in both (by the medians of each call):
    # pooled, each side's median falls between the calls, at their tails (ratio above 1), which
    # each call's own line shows is not so.
    def call(name: str, date: str, pairs: list[tuple[float, float]]) -> str:
        rows = [row for ours, own in pairs for row in (_row("skyrl", ours), _row("own", own))]
        path = tmp_path / name
        path.write_text(json.dumps({"commit": "abc", "backend": "sglang", "engine_version": "1",
                                    "model_shape": "qwen2", "colocate": True, "trainer_device": "cuda",
                                    "date": date, "rows": rows}))
        return str(path)

    slow = call("slow.json", "first", [(0.50, 0.52)] * 3)
    fast = call("fast.json", "second", [(0.33, 0.35), (0.34, 0.36), (0.45, 0.37)])
    bench_step.pool([slow, fast])
    out = capsys.readouterr().out
    step = next(line for line in out.splitlines() if line.startswith("step"))
    assert step.split()[3] == "1.067"  # pooled medians (0.45 + 0.50) / 2 over (0.37 + 0.52) / 2
    assert "first: step 0.962 (medians), 0.962 (paired)" in out
    assert "second: step 0.944 (medians), 0.944 (paired)" in out
