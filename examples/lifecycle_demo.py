"""One visible pass through every engine hook, on any backend, with timings.

    python examples/lifecycle_demo.py --backend transformers --model .cache/tiny-model

generate -> sleep -> wake -> push changed weights -> generate (output follows the new weights) ->
restore the weights -> load a LoRA adapter -> generate -> unload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from contextlib import contextmanager

import skyrl_backends as sb

PROMPTS = [[5, 6, 7], [40, 41]]
GREEDY = {"max_generate_length": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}


@contextmanager
def step(title: str):
    started = time.perf_counter()
    print(f"-> {title} ...", flush=True)
    yield
    print(f"   done in {1000 * (time.perf_counter() - started):.1f} ms", flush=True)


def hf_weights(model_dir: str, noise: float = 0.0):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    return [(n, p.detach() + noise * torch.randn(p.shape, generator=generator)) for n, p in model.named_parameters()]


async def main(backend: str, model: str) -> None:
    with step(f"create_engine({backend!r})"):
        engine = sb.create_engine(backend, model=model, enable_lora=True)
    caps = engine.capabilities
    print(f"   capabilities: {', '.join(caps.names())}")
    with step("generate (greedy, with log-probabilities)"):
        first = await engine.generate(PROMPTS, GREEDY)
    for completion in first:
        print(f"   {completion.token_ids} {completion.finish_reason} mean logprob "
              f"{sum(completion.logprobs) / len(completion.logprobs):.3f}")
    if caps.sleep:
        level = max(caps.sleep_levels)
        with step(f"sleep(level={level})"):
            await engine.sleep(level=level)
        with step("wake_up(['weights'])"):
            await engine.wake_up(["weights"])
    with step("update_named_weights (perturbed weights)"):
        version = await engine.update_weights_from_tensors(hf_weights(model, noise=0.3))
    if caps.sleep:
        with step("wake_up(['kv_cache'])"):
            await engine.wake_up(["kv_cache"])
    with step("generate with the new weights"):
        changed = await engine.generate(PROMPTS, GREEDY)
    print(f"   weight version {version}; output changed: {changed.response_ids != first.response_ids}")
    with step("update_named_weights (original weights)"):
        await engine.update_weights_from_tensors(hf_weights(model))
    restored = await engine.generate(PROMPTS, GREEDY)
    print(f"   original output restored exactly: {restored.response_ids == first.response_ids}")
    lora_dir = os.path.join(model, "lora")
    if caps.lora and os.path.isdir(lora_dir):
        with step("load_lora_adapter('demo')"):
            await engine.load_lora_adapter("demo", lora_dir)
        with step("generate with the adapter"):
            adapted = await engine.generate(PROMPTS, GREEDY, lora_name="demo")
        print(f"   adapter changes output: {adapted.response_ids != first.response_ids}")
        with step("unload_lora_adapter('demo')"):
            await engine.unload_lora_adapter("demo")
    with step("teardown"):
        await engine.teardown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=sb.DEFAULT_BACKEND)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.backend, args.model))
