"""vLLM's own weight loader under the replayed load (skyrl_backends.weight_sync.replay).

On a GPU the workers replay the load of colocated CUDA IPC updates (tests/weight_sync/test_gpu.py
runs it against vLLM's own load). vLLM's CPU platform repacks the linear weights after loading
(skyrl_backend_vllm.loading), so this test checks the loader itself inside the engine's worker, on a
model of the served architecture built there and not yet repacked: vLLM's real ``load_weights`` is
recorded without a refusal, and each later update, with new values written into the same send
buckets, is replayed and leaves every parameter exactly as vLLM's own load of those values does.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import make_engine

# The check travels to the worker as a function (cloudpickled), which vLLM accepts only with this.
INSECURE = "VLLM_ALLOW_INSECURE_SERIALIZATION"


def _replay_the_served_architecture(worker, checkpoint_path: str) -> dict:
    """Runs in the worker: three updates through one ReplayedLoad into a fresh model."""
    import torch
    from safetensors.torch import load_file
    from skyrl_backends.weight_sync.chunks import iter_weight_chunks, pack_into, unpack
    from skyrl_backends.weight_sync.replay import ReplayedLoad, parameters_and_buffers
    from vllm.model_executor.model_loader.utils import initialize_model

    # A prefix of its own: the served model's attention layers are registered under theirs.
    model = initialize_model(vllm_config=worker.vllm_config, prefix="skyrl_replay_check")
    checkpoint = load_file(checkpoint_path)
    chunks = list(iter_weight_chunks(checkpoint, bucket_bytes=1 << 16))  # several buckets
    named = [pair for chunk in chunks for pair in unpack(chunk.manifest, chunk.buffer)]
    replayed = ReplayedLoad(lambda: parameters_and_buffers(model))
    steps = []
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        new = {name: t + 0.01 * torch.randn(t.shape, generator=generator, dtype=t.dtype)
               for name, t in checkpoint.items()}
        for chunk in chunks:  # the trainer's next weights, in the same buckets
            pack_into(chunk.buffer, chunk.manifest, new)
        was_replayed = replayed.load(named, lambda pairs: model.load_weights(pairs))
        after = {name: p.detach().clone() for name, p in model.named_parameters()}
        model.load_weights(list(new.items()))  # vLLM's own load of the same values
        differing = [name for name, p in model.named_parameters() if not torch.equal(after[name], p)]
        steps.append({"replayed": was_replayed, "differing": differing})
    return {"steps": steps, "refused": replayed.refused, "parameters": len(after)}


async def test_vllms_own_loader_is_recorded_and_replayed_exactly(model_dir, monkeypatch):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv(INSECURE, "1")  # read by the engine's processes, started below
    engine = make_engine(model_dir)
    try:
        [result] = await engine.impl._engine.collective_rpc(
            _replay_the_served_architecture, args=(os.path.join(model_dir, "model.safetensors"),))
    finally:
        await engine.teardown()
    assert result["refused"] is None
    assert [s["replayed"] for s in result["steps"]] == [False, True, True]  # recorded, then replayed
    assert all(s["differing"] == [] for s in result["steps"]), result["steps"]
    assert result["parameters"] > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
