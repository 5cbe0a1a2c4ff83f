"""``engine_init_kwargs={"lm_head_dtype": "float32"}``: a half-precision model whose logits are
computed in float32 (the trainer/engine consistency option, see docs/consistency.md)."""

import asyncio

import pytest
import torch

import skyrl_backends as sb
from skyrl_backends.conformance.oracles import ReferenceModel
from skyrl_backends.consistency.lm_head import use_float32_lm_head
from skyrl_backends.errors import ConfigError

FP32_HEAD = {"engine_init_kwargs": {"lm_head_dtype": "float32"}}


def first_token_logprobs(model_dir, prompts, **options):
    """Each prompt's first token, one request at a time: a batch of prompts of different lengths is
    padded, and bfloat16 kernels for the padded shapes round differently on some CPUs (up to 0.02
    nats off the unpadded forward pass on one of the CI machines' kind), which is not the head's doing."""
    async def go():
        engine = sb.create_engine("transformers", model=model_dir, dtype="bfloat16", device="cpu", **options)
        try:
            params = {"max_generate_length": 1, "temperature": 0, "logprobs": 0}
            out = [(await engine.generate([prompt], params))[0] for prompt in prompts]
            return out, await engine.weight_specs()
        finally:
            await engine.teardown()

    return asyncio.run(go())


def test_first_token_logprobs_are_those_of_a_float32_head(model_dir):
    plain = ReferenceModel(model_dir, dtype=torch.bfloat16)
    fp32_head = ReferenceModel(model_dir, dtype=torch.bfloat16)
    use_float32_lm_head(fp32_head.module)
    prompts = plain.prompts(6, seed=5)
    out, specs = first_token_logprobs(model_dir, prompts, **FP32_HEAD)
    off_fp32_head, off_plain = [], []
    for prompt, completion in zip(prompts, out, strict=True):
        token, got = completion.token_ids[0], completion.logprobs[0]
        off_fp32_head.append(abs(got - float(fp32_head.teacher_forced_logprobs(prompt, [token])[0, token])))
        off_plain.append(abs(got - float(plain.teacher_forced_logprobs(prompt, [token])[0, token])))
    # The prefill is the same forward pass as the reference's: only the head's precision differs.
    assert max(off_fp32_head) < 1e-5
    assert max(off_plain) > 1e-3  # a bfloat16 head would have given these
    # The weights stay in the model's dtype: weight updates are checked against these specs.
    assert specs["lm_head.weight"].dtype == "bfloat16"


def test_an_unknown_head_dtype_is_refused_by_name(model_dir):
    with pytest.raises(ConfigError, match="engine_init_kwargs.lm_head_dtype"):
        sb.create_engine("transformers", model=model_dir, dtype="bfloat16", device="cpu",
                         engine_init_kwargs={"lm_head_dtype": "fp32"})
