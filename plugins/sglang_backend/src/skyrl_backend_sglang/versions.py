"""Weight versions of SGLang's tokens, as SGLang itself labels them.

When an update request carries a ``weight_version``, SGLang's scheduler records, for every live
request, how many tokens it had produced under the previous version (in the same step of its loop
that applies the weights), and reports a finished request's spans in
``meta_info["weight_versions"]`` (``[{"version", "start", "end"}, ...]``). The plugin sends the
facade's version with every update, so the spans are the per-token versions the facade asks for.
Releases without those spans do not declare ``token_versions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

from packaging.version import Version
from skyrl_backends.types import TokenVersions

# The first release checked to report spans (0.5.23, the CPU build; 0.5.17, the GPU one, does not).
LABELS_TOKENS_FROM = Version("0.5.23")


def engine_labels_tokens(engine_init_kwargs: Mapping[str, Any], cpu: bool) -> bool:
    """Whether SGLang's per-token versions are exact for an engine with these options (package
    metadata only, no import): the installed release reports them, and overlap scheduling is off
    (the plugin turns it off on the CPU). SGLang labels a token when its step's result is
    processed; under overlap a result still in flight when an in-place pause applies an update is
    labelled with the new version although the old weights computed it."""
    try:
        reports = Version(metadata.version("sglang")).release >= LABELS_TOKENS_FROM.release
    except metadata.PackageNotFoundError:
        return False
    return reports and bool(engine_init_kwargs.get("disable_overlap_schedule", cpu))


def version_number(label: Any) -> int:
    """SGLang's label of a version as the facade's number ("default": before any update)."""
    text = str(label)
    return int(text) if text.isdigit() else 0


def from_meta(meta_info: Mapping[str, Any], count: int) -> TokenVersions | None:
    """The versions of a finished request's first ``count`` tokens, or None without spans."""
    spans = meta_info.get("weight_versions")
    if not spans:
        return None
    per_token: list[int] = []
    for span in spans:
        per_token.extend([version_number(span["version"])] * (int(span["end"]) - int(span["start"])))
    if len(per_token) < count:
        return None
    return TokenVersions.from_per_token(per_token[:count])
