"""The pooling of generation benchmark results over machine calls, and the commit they record."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
from skyrl_backends.testing.provenance import measured_commit

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _pool_generate():
    spec = importlib.util.spec_from_file_location("pool_generate", BENCHMARKS / "pool_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, name: str, native: list[float], plugin: list[float], **fields) -> str:
    result = {"date": name, "commit": "abc1234", "vllm": "0.26.0", "model": "m", "dtype": "bfloat16",
              "prompts": 256, "prompt_len": 128, "max_tokens": 128, "logprobs": False,
              "engine_kwargs": {"enforce_eager": True}, "native_tok_s": native, "plugin_tok_s": plugin, **fields}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return str(path)


def test_pooled_over_calls_medians_and_pairs(tmp_path):
    pool = _pool_generate()
    runs = pool.load([_run(tmp_path, "a", [100.0, 110.0, 90.0], [95.0, 110.0, 99.0]),
                      _run(tmp_path, "b", [200.0, 210.0], [210.0, 189.0])])
    pooled = pool.pool(runs)
    assert pooled["calls"] == 2 and pooled["runs"] == 5
    assert pooled["native_median"] == 110.0 and pooled["plugin_median"] == 110.0
    # pairs: 0.95, 1.0, 1.1, 1.05, 0.9 -> median 1.0
    assert pooled["paired_median"] == pytest.approx(1.0)
    assert [c[0] for c in pooled["per_call"]] == ["a", "b"]


@pytest.mark.parametrize("field, value", [("commit", "def5678"), ("engine_kwargs", {}), ("max_tokens", 64)])
def test_runs_of_different_settings_are_not_pooled(tmp_path, field, value):
    pool = _pool_generate()
    paths = [_run(tmp_path, "a", [1.0], [1.0]), _run(tmp_path, "b", [1.0], [1.0], **{field: value})]
    with pytest.raises(SystemExit, match=field):
        pool.load(paths)


def test_the_commit_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("SKYRL_COMMIT", "frozen1")
    assert measured_commit() == "frozen1"


def test_the_commit_of_a_checkout_is_its_head(monkeypatch, tmp_path):
    monkeypatch.delenv("SKYRL_COMMIT", raising=False)
    assert measured_commit(tmp_path) is None  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert measured_commit(tmp_path) == head
    (tmp_path / "f").write_text("y")
    assert measured_commit(tmp_path) == f"{head}-dirty"


def _wake_cycle_run(tmp_path: Path, name: str, **fields) -> str:
    phases = ("sleep", "wake_weights", "sync", "wake_kv_cache", "first_token", "cycle")
    result = {"benchmark": "wake_cycle", "engine": "vllm", "engine_version": "0.26.0", "shape": "s", "level": 2,
              "commit": "abc1234", "rows": [{"phase": p, "skyrl": [1.0, 2.0], "own": [2.0, 2.0]} for p in phases],
              **fields}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return str(path)


def _wake_cycle_module():
    spec = importlib.util.spec_from_file_location("bench_wake_cycle", BENCHMARKS / "bench_wake_cycle.py")
    wake_cycle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wake_cycle)
    return wake_cycle


def test_wake_cycles_with_a_kv_wake_delay_are_pooled_apart(tmp_path, capsys):
    wake_cycle = _wake_cycle_module()
    before = _wake_cycle_run(tmp_path, "before")  # written before the option existed: no delay
    plain, delayed = (_wake_cycle_run(tmp_path, name, kv_wake_delay_ms=value)
                      for name, value in (("plain", 0.0), ("delayed", 60.0)))
    wake_cycle.pool([before, plain])
    assert "2 calls; milliseconds" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="kv_wake_delay_ms"):
        wake_cycle.pool([plain, delayed])
    wake_cycle.pool([delayed, delayed])
    assert "the KV cache woken 60 ms later (untimed)" in capsys.readouterr().out


def test_the_pooled_wake_cycle_adds_the_time_from_sleep_to_kv_cache_awake(tmp_path, capsys):
    """The derived row sums, round by round, the phases up to the KV cache's wake (not the first
    token): the time a wake that waits for the sleep to settle keeps constant."""
    skyrl = {"sleep": [0.001, 0.002], "wake_weights": [0.010, 0.020], "sync": [0.1, 0.2],
             "wake_kv_cache": [0.3, 0.4], "first_token": [5.0, 5.0]}
    rows = [{"phase": p, "skyrl": t, "own": [2 * x for x in t]} for p, t in skyrl.items()]
    rows.append({"phase": "cycle", "skyrl": [1.0, 1.0], "own": [1.0, 1.0]})
    path = _wake_cycle_run(tmp_path, "run", rows=rows)
    _wake_cycle_module().pool([path])
    # rounds of 411 and 622 ms: their median 516.5; the engine's side twice each
    assert "| sleep start to KV cache awake | 516.5 (516.5) | 1033.0 (1033.0) | 0.500 / 0.500 |" \
        in capsys.readouterr().out


def test_the_kv_wake_delay_is_waited_before_that_wake_and_not_timed(monkeypatch):
    wake_cycle = _wake_cycle_module()
    monkeypatch.setattr(wake_cycle.torch.cuda, "synchronize", lambda: None)  # no GPU work to wait for here
    started: dict[str, float] = {}

    def phase(name):
        async def run():
            started[name] = time.perf_counter()
        return run

    times = asyncio.run(wake_cycle.run_cycle({name: phase(name) for name in wake_cycle.PHASES}, 0.2))
    assert started["wake_kv_cache"] - started["sync"] >= 0.2  # the delay comes right before the KV wake
    assert started["sync"] - started["sleep"] < 0.1 and started["first_token"] - started["wake_kv_cache"] < 0.1
    assert times["wake_kv_cache"] < 0.1 and times["cycle"] < 0.1  # and is timed in no phase
