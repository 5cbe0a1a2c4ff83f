import asyncio

import pytest

pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The same weights loaded by plain transformers: the independent oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir):
    import skyrl_backends as sb

    eng = sb.create_engine("transformers", model=model_dir, enable_lora=True, dtype="float32")
    yield eng
    asyncio.run(eng.teardown())


def run(coro):
    return asyncio.run(coro)
