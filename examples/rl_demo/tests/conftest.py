from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> str:
    from skyrl_backends.testing.tiny_model import resolve_test_model

    return resolve_test_model(build_into=Path(__file__).resolve().parents[3] / ".cache" / "tiny-model")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
