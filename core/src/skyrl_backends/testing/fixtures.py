"""Fixtures every test suite of the repository shares, as a pytest plugin.

Switch it on in a conftest with ``pytest_plugins = ["skyrl_backends.testing.fixtures"]``. It finds
the tiny offline model through one rule (:func:`~skyrl_backends.testing.tiny_model.resolve_test_model`:
``SKYRL_TEST_MODEL``, else built once into ``<rootdir>/.cache/tiny-model``), so no suite keeps a
copy of the lookup.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from skyrl_backends.testing.tiny_model import LORA_DIR, resolve_test_model


@pytest.fixture(scope="session")
def model_dir(request: pytest.FixtureRequest) -> str:
    """The tiny test model's folder."""
    path = resolve_test_model(build_into=Path(request.config.rootpath) / ".cache" / "tiny-model")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def lora_dir(model_dir: str) -> str:
    """The tiny model's LoRA adapter (a PEFT folder)."""
    return os.path.join(model_dir, LORA_DIR)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str) -> Any:
    """The tiny model's tokenizer (transformers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
