"""SGLang's own weight loader under the plugin's replayed loader, in SGLang's scheduler on the CPU.

The plugin names its loader for colocated CUDA IPC updates only (a GPU; tests/weight_sync/test_gpu.py
runs that against SGLang's own load). Here the same loader is registered by hand and sent whole CPU
buckets, which SGLang shares with its scheduler as it shares tensors: SGLang's real ``load_weights``
must be recorded once, without a refusal, and every later update, with new values written into the
same buckets, must serve exactly what SGLang serves after loading those values itself.
"""

from __future__ import annotations

import os

from conftest import ENGINE_OPTIONS, run

GREEDY = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], [100, 42, 17]]


async def _send_buckets(engine, pairs, load_format: str) -> None:
    from sglang.srt.managers import io_struct
    from sglang.srt.utils import MultiprocessingSerializer

    impl = engine.impl
    obj = io_struct.UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=[MultiprocessingSerializer.serialize(pairs)], load_format=load_format,
        flush_cache=True)
    success, message = await impl._on_loop(impl._update_in_session(impl.tm.update_weights_from_tensor, obj))
    assert success, message


def test_sglangs_own_loader_is_recorded_once_then_replayed_exactly(model_dir, capfd):
    import skyrl_backends as sb
    import torch
    from safetensors.torch import load_file
    from skyrl_backend_sglang import replayed_load
    from skyrl_backends.weight_sync.chunks import iter_weight_chunks, pack_into

    engine = sb.create_engine("sglang", model=model_dir, **ENGINE_OPTIONS,
                              engine_init_kwargs={"custom_weight_loader": [replayed_load.LOADER]})
    try:
        checkpoint = load_file(os.path.join(model_dir, "model.safetensors"))
        chunks = list(iter_weight_chunks(checkpoint, bucket_bytes=1 << 16))
        pairs = replayed_load.bucket_pairs([(chunk.manifest, chunk.buffer) for chunk in chunks])
        served = []
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            new = {name: t + 0.5 * t.std().nan_to_num(0.1) * torch.randn(t.shape, generator=generator)
                   for name, t in checkpoint.items()}
            for chunk in chunks:  # the trainer's next weights, in the same buckets
                pack_into(chunk.buffer, chunk.manifest, new)
            run(_send_buckets(engine, pairs, replayed_load.LOADER))
            ours = run(engine.generate(PROMPTS, GREEDY)).response_ids
            run(engine.update_weights_from_tensors(list(new.items())))  # SGLang's own load
            assert run(engine.generate(PROMPTS, GREEDY)).response_ids == ours, f"update {step}"
            served.append(ours)
        assert served[0] != served[1] != served[2]
    finally:
        run(engine.teardown())
    log = capfd.readouterr().err
    assert "is not replayed" not in log, log[-2000:]
    assert log.count(f"weight load of {len(checkpoint)} tensors recorded") == 1, log[-2000:]
