"""Markers that tie a conformance test to capabilities and to a row of the parity table.

Both are plain function attributes rather than pytest marks, so importing the suite never needs
the plugin's mark registration.

``@requires(capabilities.LORA)`` makes a test *unsupported (declared)* when the backend declares the
capability absent: the test is skipped with a reason that starts with :data:`UNSUPPORTED_PREFIX` and
names the capability (:func:`skyrl_backends.capabilities.missing` decides what is missing), so the
report and the parity table can tell it from any other skip. A declared capability is tested, and
fails if it does not work.

``@feature("Stop strings")`` names the parity-table row a test feeds; a test without it feeds its
group's row (the ``feature`` attribute of its class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from skyrl_backends.capabilities import Requirement

UNSUPPORTED_PREFIX = "unsupported (declared): "
REJECTED_PREFIX = "unsupported (rejected): "
REQUIRES_ATTR = "__conformance_requires__"
FEATURE_ATTR = "__conformance_feature__"

F = TypeVar("F", bound=Callable[..., object])


def requires(*requirements: Requirement) -> Callable[[F], F]:
    """Mark a test as needing every requirement (constants and constructors of
    :mod:`skyrl_backends.capabilities`, e.g. ``requires(capabilities.LORA, capabilities.sleep_level(2))``)."""
    for requirement in requirements:
        if not isinstance(requirement, Requirement):
            raise TypeError(f"requires() takes skyrl_backends.capabilities requirements such as capabilities.LORA, "
                            f"not {requirement!r}")

    def mark(test: F) -> F:
        setattr(test, REQUIRES_ATTR, tuple(getattr(test, REQUIRES_ATTR, ())) + requirements)
        return test

    return mark


def feature(row: str) -> Callable[[F], F]:
    """Name the parity-table row a test feeds."""
    def mark(test: F) -> F:
        setattr(test, FEATURE_ATTR, row)
        return test

    return mark


def required_capabilities(test: object) -> tuple[Requirement, ...]:
    return tuple(getattr(test, REQUIRES_ATTR, ()))


def feature_of_function(test: object, default: str) -> str:
    return getattr(test, FEATURE_ATTR, default)


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
