"""Markers that tie a conformance test to capabilities and to a row of the parity table.

``@requires("lora")`` makes a test *unsupported (declared)* when the backend declares the capability
absent: the test is skipped with a reason that starts with :data:`UNSUPPORTED_PREFIX` and names the
capability, so the report and the parity table can tell it from any other skip. A declared
capability is tested, and fails if it does not work.

``@feature("Stop strings")`` names the parity-table row a test feeds; a test without it feeds its
group's row (the ``feature`` attribute of its class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from skyrl_backends.types import Capabilities

UNSUPPORTED_PREFIX = "unsupported (declared): "
REJECTED_PREFIX = "unsupported (rejected): "
REQUIRES_MARK = "conformance_requires"
FEATURE_MARK = "conformance_feature"

F = TypeVar("F", bound=Callable[..., object])


def requires(*capabilities: str) -> pytest.MarkDecorator:
    """Mark a test as needing every named capability (see :func:`capability_present`)."""
    for name in capabilities:
        capability_present(Capabilities(), name)  # reject misspelled names at import time
    return getattr(pytest.mark, REQUIRES_MARK)(*capabilities)


def feature(row: str) -> pytest.MarkDecorator:
    return getattr(pytest.mark, FEATURE_MARK)(row)


def capability_present(caps: Capabilities, name: str) -> bool:
    """Whether ``caps`` declares ``name``.

    Besides every boolean field of :class:`Capabilities` (``lora``, ``stop_strings``...), the suite
    knows ``sleep``, ``sleep_level:N`` (level N is declared), ``discards_weights`` (some declared
    level drops the weights) and ``weight_sync:STRATEGY`` (e.g. ``weight_sync:tensors``)."""
    if name.startswith("sleep_level:"):
        return int(name.split(":", 1)[1]) in caps.sleep_levels
    if name == "discards_weights":
        return caps.discards_weights_at_level is not None and any(
            level >= caps.discards_weights_at_level for level in caps.sleep_levels)
    if name.startswith("weight_sync:"):
        return name.split(":", 1)[1] in caps.weight_sync_strategies
    return caps.has(name)


def missing_capabilities(caps: Capabilities, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not capability_present(caps, n)]


def unsupported_reason(missing: list[str]) -> str:
    return UNSUPPORTED_PREFIX + ", ".join(missing)
