import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> str:
    path = os.environ.get("SKYRL_TEST_MODEL")
    if not path:
        from skyrl_backends.testing.tiny_model import build_tiny_model

        path = str(build_tiny_model(Path(__file__).resolve().parents[3] / ".cache" / "tiny-model"))
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
