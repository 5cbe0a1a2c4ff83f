"""Where the shipped test tools keep files between runs: the tiny test model and Hypothesis's data.

``$SKYRL_BACKENDS_CACHE`` when set, else ``~/.cache/skyrl_backends``; never the working directory, so
running the conformance suite leaves nothing where it was started.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SKYRL_BACKENDS_CACHE"


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root (not created here)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "skyrl_backends")
    return root.joinpath(*parts)
