"""A trainer sharded with FSDP2 over two ranks (gloo, CPU) syncs its weights into engine processes.

The engines are real engines of the selected backend (``SKYRL_WEIGHT_SYNC_BACKEND``, default
transformers), each in its own OS process. The two trainer ranks (``sharded_trainer.py``) hold
DTensor shards of the tiny model and call ``sync_weights`` collectively, through shared memory and
gloo broadcast (packed, per tensor, streamed), with the ranks writing into shared memory or
gathering over the group. After each sharded sync the engines serve exactly what they serve after
the same weights arrive unsharded from one process (tokens and log-probabilities), and the greedy
tokens of Hugging Face decoding with those weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from remote_engine import RemoteEngine

TRAINER = Path(__file__).with_name("sharded_trainer.py")
pytestmark = pytest.mark.filterwarnings("ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engines(backend, model_dir, num_engines):
    started = [RemoteEngine(backend, model_dir, wait=False, dtype="float32") for _ in range(num_engines)]
    for engine in started:
        engine.wait_ready()
    yield started
    for engine in started:
        engine.close()


@pytest.fixture(scope="module")
def ranks(engines, backend, model_dir):
    """Both ranks' results of the whole scenario (one run of the two trainer processes)."""
    described = json.dumps([[e.port, e.capabilities.to_dict()] for e in engines])
    port = _free_port()
    processes = [subprocess.Popen([sys.executable, str(TRAINER), "--rank", str(rank), "--world", "2",
                                   "--port", str(port), "--model", model_dir, "--backend", backend,
                                   "--engines", described], stdout=subprocess.PIPE, text=True)
                 for rank in range(2)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=900)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"trainer rank exited {process.returncode} without a result:\n{out[-3000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def test_sharded_sync_serves_the_unsharded_weights(ranks, engines):
    first, second = ranks
    assert len(first["cases"]) == 5
    expected_version = 0
    for case, other in zip(first["cases"], second["cases"], strict=True):
        label = f"{case['strategy']} {case.get('layout', '')} {case.get('apply', '')} " \
                f"separate_machines={case['separate_machines']}"
        expected_version += 1
        # Every rank returns the versions the engines serve; one sharded sync is one update each.
        assert case["versions"] == other["versions"] == [expected_version] * len(engines), label
        for engine_index, (sharded, unsharded) in enumerate(zip(case["sharded"], case["unsharded"], strict=True)):
            assert sharded["tokens"] == unsharded["tokens"] == case["oracle"], (label, engine_index)
            assert sharded["logprobs"] == unsharded["logprobs"], (label, engine_index)  # the same bytes
            assert sharded["stamped"] == [expected_version] * len(sharded["tokens"]), label
        expected_version += 1  # the unsharded sync that followed
        assert case["unsharded_versions"] == [expected_version] * len(engines)
    # The cases changed the weights, so the engines did not pass by serving the same thing throughout.
    assert len({json.dumps(c["oracle"]) for c in first["cases"]}) > 1


def test_a_rank_calling_differently_fails_on_every_rank(ranks):
    for result in ranks:
        failures = result["failures"]
        strategy = failures["strategy"]
        assert strategy["type"] == "WeightUpdateError"
        assert "'broadcast' here but 'shared_memory' on rank 0" in strategy["problems"]["rank 1: strategy"]
        assert "rank 1: bucket_bytes" in failures["bucket_bytes"]["problems"]
        assert "a model sharded across ranks is sent with one of" in failures["tensors"]["problems"]["strategy"]


def test_an_update_the_engines_refuse_fails_on_every_rank_and_changes_nothing(ranks):
    for result in ranks:
        refused = result["failures"]["engine_refuses"]
        assert refused["type"] == "WeightUpdateError"
        assert "dtype float16 does not match the engine's float32" in refused["problems"]["model.norm.weight"]
    after, before = ranks[0]["failures"]["versions_after_refusal"]
    assert after == before


def test_a_missing_rank_is_named_after_the_timeout_and_the_next_sync_works(ranks):
    missing = ranks[0]["failures"]["missing_rank"]
    assert missing["type"] == "WeightUpdateError"
    assert "missing: rank 1" in missing["problems"]["ranks"]
    first, second = ranks
    assert first["after_missing_rank"] == second["after_missing_rank"]
    assert first["after_missing_rank_served"] == first["after_missing_rank_oracle"]
