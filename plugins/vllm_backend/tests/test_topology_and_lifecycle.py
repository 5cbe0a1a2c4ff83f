"""vLLM's default topology (client, engine-core process, separate worker process), teardown, and
sleep: declared absent on CPU, exercised for real on GPU."""

from __future__ import annotations

import psutil
import pytest

from conftest import GREEDY, MULTIPROCESSING_ENV, PROMPTS, make_engine
from skyrl_backends.errors import UnsupportedCapabilityError
from skyrl_backend_vllm.engine_platform import detect_platform

ON_CPU = detect_platform() == "cpu"


def _children() -> set[int]:
    """Child processes, except multiprocessing's resource tracker: a helper of this process that
    lives as long as it does (started by the first shared-memory segment), not part of the engine."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "multiprocessing.resource_tracker" not in " ".join(_cmdline(p))}


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


async def test_default_multiprocess_topology_serves_updates_and_tears_down_completely(model_dir, checkpoint,
                                                                                      monkeypatch):
    before = _children()
    # vLLM's own default: the worker in a process of its own, beside the engine core.
    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")
    engine = make_engine(model_dir)
    try:
        spawned = _children() - before
        assert len(spawned) >= 2  # the engine core and at least one worker
        workers = await engine.impl._engine.collective_rpc("skyrl_pid")
        if ON_CPU:  # vLLM's CPU default: the worker in a process of its own, started by the engine core
            assert all(psutil.Process(pid).ppid() in spawned for pid in workers)
        else:  # one GPU: the worker lives in the engine-core process
            assert set(workers) <= spawned
        assert await engine.impl._engine.collective_rpc("skyrl_platform") == ["cpu" if ON_CPU else "cuda"]
        base = (await engine.generate(PROMPTS, {**GREEDY, "ignore_eos": True})).response_ids
        await engine.update_weights_from_tensors([("lm_head.weight", -checkpoint["lm_head.weight"])])
        assert (await engine.generate(PROMPTS, {**GREEDY, "ignore_eos": True})).response_ids != base
        await engine.update_weights_from_tensors(list(checkpoint.items()))
        assert (await engine.generate(PROMPTS, {**GREEDY, "ignore_eos": True})).response_ids == base
    finally:
        await engine.teardown()
    alive = [(pid, _cmdline(psutil.Process(pid))) for pid in spawned & _children()
             if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"engine processes left running after teardown: {alive}"
    assert engine.closed


@pytest.mark.skipif(not ON_CPU, reason="vLLM on CPU only")
async def test_sleep_is_declared_absent_on_cpu_and_refused(engine):
    # vLLM's CPU worker logs "sleep mode is not supported" and frees nothing: never claim it did.
    assert not engine.capabilities.sleep
    with pytest.raises(UnsupportedCapabilityError, match="sleep"):
        await engine.sleep(level=1)
    assert engine.asleep_tags == frozenset()


@pytest.mark.skipif(ON_CPU, reason="sleep mode needs vLLM on a GPU")
@pytest.mark.parametrize("level", [1, 2])
async def test_sleep_frees_gpu_memory_and_wake_restores_service(model_dir, checkpoint, level):
    import torch

    engine = make_engine(model_dir, gpu_memory_utilization=0.3)
    try:
        base = (await engine.generate(PROMPTS, GREEDY)).response_ids
        free_before = torch.cuda.mem_get_info()[0]
        await engine.sleep(level=level)
        assert torch.cuda.mem_get_info()[0] > free_before  # memory really went back
        await engine.wake_up(tags=["weights"])
        if level >= 2:  # weights were discarded: the facade refuses to generate until they arrive
            assert not engine.weights_loaded
            await engine.update_weights_from_tensors(list(checkpoint.items()))
        await engine.wake_up(tags=["kv_cache"])
        assert (await engine.generate(PROMPTS, GREEDY)).response_ids == base
    finally:
        await engine.teardown()
