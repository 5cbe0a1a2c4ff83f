"""Real SGLang on the CPU: one engine for the session, a float32 transformers reference beside it.

SGLang's CPU path needs the test-only import hook in ``hook/`` (see its docstring) in this process
and in the scheduler processes SGLang spawns; both get it here (the make target also sets it).
Each test runs its coroutine on a fresh event loop (``asyncio.run``): the plugin must work from any
loop, as it does for a trainer's.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from pathlib import Path

import pytest

HOOK_DIR = Path(__file__).resolve().parent / "hook"
if str(HOOK_DIR) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK_DIR), os.environ.get("PYTHONPATH")) if p)
if "sgl_kernel" not in sys.modules:
    runpy.run_path(str(HOOK_DIR / "sitecustomize.py"))
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ENGINE_OPTIONS = {"device": "cpu", "dtype": "float32", "max_model_len": 512}
pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def engine(model_dir):
    import skyrl_backends as sb

    eng = sb.create_engine("sglang", model=model_dir, **ENGINE_OPTIONS)
    yield eng
    run(eng.teardown())


@pytest.fixture(scope="session")
def reference(model_dir):
    """The same weights in transformers, float32: the oracle for tokens and log-probabilities."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Reference(model, AutoTokenizer.from_pretrained(model_dir))


class Reference:
    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def logprobs(self, prompt: list[int], response: list[int]):
        """Teacher-forced log-softmax rows for each response position."""
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([prompt + response])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)], dim=-1)

    def greedy(self, prompt: list[int], length: int) -> list[int]:
        import torch

        ids = list(prompt)
        with torch.no_grad():
            for _ in range(length):
                ids.append(int(self.model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
