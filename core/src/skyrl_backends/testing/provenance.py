"""Which code a measurement ran: the commit that benchmark results and their pools record."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "SKYRL_COMMIT"


def measured_commit(repo: str | os.PathLike[str] | None = None) -> str | None:
    """``SKYRL_COMMIT`` when set (a frozen snapshot on the GPU machine has no git), else git's HEAD of
    ``repo`` (default: this package's checkout), with ``-dirty`` when the working tree has changes;
    None outside a checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=10, cwd=where)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
