"""Markers that tie a conformance test to capabilities and to a row of the parity table.

Both are plain function attributes rather than pytest marks, so importing the suite never needs
the plugin's mark registration.

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

from skyrl_backends.types import Capabilities

UNSUPPORTED_PREFIX = "unsupported (declared): "
REJECTED_PREFIX = "unsupported (rejected): "
REQUIRES_ATTR = "__conformance_requires__"
FEATURE_ATTR = "__conformance_feature__"

F = TypeVar("F", bound=Callable[..., object])


def requires(*capabilities: str) -> Callable[[F], F]:
    """Mark a test as needing every named capability (see :func:`capability_present`)."""
    for name in capabilities:
        capability_present(Capabilities(), name)  # reject misspelled names at import time

    def mark(test: F) -> F:
        setattr(test, REQUIRES_ATTR, tuple(getattr(test, REQUIRES_ATTR, ())) + capabilities)
        return test

    return mark


def feature(row: str) -> Callable[[F], F]:
    """Name the parity-table row a test feeds."""
    def mark(test: F) -> F:
        setattr(test, FEATURE_ATTR, row)
        return test

    return mark


def required_capabilities(test: object) -> tuple[str, ...]:
    return tuple(getattr(test, REQUIRES_ATTR, ()))


def feature_of_function(test: object, default: str) -> str:
    return getattr(test, FEATURE_ATTR, default)


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


# Capabilities that only mean something when their root is declared: a backend without sleep is
# reported as lacking "sleep", not each sleep level.
_ROOTS = {"discards_weights": "sleep", "sleep_tags": "sleep"}


def _root(name: str) -> str:
    return "sleep" if name.startswith("sleep_level:") else _ROOTS.get(name, name)


def missing_capabilities(caps: Capabilities, names: tuple[str, ...]) -> list[str]:
    missing: list[str] = []
    for name in names:
        if capability_present(caps, name):
            continue
        root = _root(name)
        reported = root if root != name and not capability_present(caps, root) else name
        if reported not in missing:
            missing.append(reported)
    return missing


def merge_unsupported(reasons: list[str]) -> str:
    """One reason naming every absent capability of several skipped tests, each once."""
    names: list[str] = []
    for reason in reasons:
        for name in reason.removeprefix(UNSUPPORTED_PREFIX).split(", "):
            if name and name not in names:
                names.append(name)
    return unsupported_reason(names)


def unsupported_reason(missing: list[str]) -> str:
    return UNSUPPORTED_PREFIX + ", ".join(missing)
