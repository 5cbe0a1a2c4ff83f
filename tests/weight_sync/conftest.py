import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer


@pytest.fixture(scope="session")
def backend() -> str:
    """The backend whose engines run in the engine processes (``SKYRL_WEIGHT_SYNC_BACKEND``)."""
    return os.environ.get("SKYRL_WEIGHT_SYNC_BACKEND", "transformers")


@pytest.fixture(scope="session")
def num_engines() -> int:
    """How many engine processes the trainer feeds at once (``SKYRL_WEIGHT_SYNC_ENGINES``, default 2)."""
    return int(os.environ.get("SKYRL_WEIGHT_SYNC_ENGINES", "2"))
