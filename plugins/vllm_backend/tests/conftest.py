"""Fixtures for the vLLM backend's tests: real vLLM engines on the tiny test model.

Engines are shared per session (each start costs seconds to a minute on two cores) and all tests
run on one event loop (see ``[tool.pytest.ini_options]``), the loop the engines' background tasks
live on. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` makes most engines run their worker inside the
engine-core process (AsyncLLM still runs the engine core in a process of its own), one process
fewer to start; ``test_topology_and_lifecycle.py`` covers vLLM's default topology with a separate
worker process.
"""

from __future__ import annotations

import os

import pytest
import skyrl_backends as sb

pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer

# Read when an engine is configured: in-process workers unless a test asks for the default.
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
os.environ.setdefault(MULTIPROCESSING_ENV, "0")


def make_engine(model_dir: str, **options) -> sb.InferenceEngine:
    # On a GPU several test engines share the device (ignored on CPU, where VLLM_CPU_KVCACHE_SPACE rules).
    options.setdefault("gpu_memory_utilization", 0.15)
    return sb.create_engine("vllm", model=model_dir, dtype="float32", max_model_len=1024, seed=0, **options)


@pytest.fixture(scope="session")
async def engine(model_dir: str):
    """A plain engine (prefix caching on, LoRA off)."""
    eng = make_engine(model_dir)
    yield eng
    await eng.teardown()


@pytest.fixture(scope="session")
async def lora_engine(model_dir: str):
    """An engine with LoRA enabled: vLLM wraps the target layers (``base_layer``)."""
    eng = make_engine(model_dir, enable_lora=True, max_lora_rank=8, max_loras=2)
    yield eng
    await eng.teardown()


@pytest.fixture(scope="session")
def checkpoint(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


GREEDY = {"max_generate_length": 16, "temperature": 0}
PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 200, 300, 400, 50]]
