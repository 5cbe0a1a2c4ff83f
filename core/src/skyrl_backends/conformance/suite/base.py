"""What every conformance test group shares: the capability gate and the shared-engine guard."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import (
    REJECTED_PREFIX,
    feature_of_function,
    required_capabilities,
    unsupported_reason,
)
from skyrl_backends.errors import SamplingParamsError

FAILED_KEY = pytest.StashKey[bool]()


class ConformanceTestBase:
    """Base of every test group. Subclasses set ``feature_row``, the parity-table row their tests feed
    unless a test says otherwise with ``@feature(...)``.

    A backend's suite subclass may set:

    * ``backend``: the backend's name (its entry-point name);
    * ``model``: a model folder (default: the suite's tiny model);
    * ``engine_options``: extra :func:`~skyrl_backends.create_engine` options;
    * ``expected_failures``: ``{"test_name": "reason"}`` for standard tests the backend is known to
      fail (strict: a test listed here that passes is reported, so the list cannot go stale);
    * ``conformance_overrides``: ConformanceConfig fields (tolerances, bounds).
    """

    feature_row: ClassVar[str] = "Other"
    backend: ClassVar[str | None] = None
    model: ClassVar[str | None] = None
    engine_options: ClassVar[dict[str, Any]] = {}
    expected_failures: ClassVar[dict[str, str]] = {}
    conformance_overrides: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _conformance_guard(self, request: pytest.FixtureRequest, conformance: ConformanceHarness) -> Iterator[None]:
        required = required_capabilities(request.function)
        missing = capabilities.missing(conformance.capabilities, required)
        if missing:
            pytest.skip(unsupported_reason(missing))
        yield
        if request.node.stash.get(FAILED_KEY, False) or not conformance.shared_engine_is_clean():
            conformance.discard_shared()


@contextlib.contextmanager
def honoured_or_rejected(field: str) -> Iterator[None]:
    """Around a check that a parameter is honoured: a backend may instead reject the parameter, by
    name, and the test is then reported as unsupported; never may it accept and ignore it."""
    try:
        yield
    except SamplingParamsError as error:
        if error.field != field:
            raise
        pytest.skip(f"{REJECTED_PREFIX}{field}: {error}")


def require_parameter(conformance: ConformanceHarness, field: str, params: dict[str, Any],
                      requirement: capabilities.Requirement | None = None) -> None:
    """Gate a test of a sampling parameter on the capability it requires (``requirement``, by default
    the parameter's entry in :data:`skyrl_backends.capabilities.PARAMETER_REQUIREMENTS`). When the
    backend declares it absent, check that using it is rejected with an error naming the parameter
    (never silently dropped), then report the test as unsupported."""
    requirement = requirement or capabilities.PARAMETER_REQUIREMENTS[field]
    if requirement(conformance.capabilities):
        return
    capability = requirement.name
    prompt = conformance.reference.prompts(1, seed=99)[0]
    try:
        conformance.generate([prompt], params)
    except SamplingParamsError as error:
        assert error.field == field, f"rejected with an error naming {error.field!r}, not {field!r}: {error}"
    else:
        pytest.fail(f"{field}={params[field]!r} was accepted although capability {capability!r} is declared "
                    f"absent: the parameter must be rejected, not dropped")
    pytest.skip(unsupported_reason([capability]))


def standard_tests(cls: type) -> dict[str, Any]:
    """Every standard test a suite class inherits, by name, as the function the suite defines."""
    tests: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("skyrl_backends.conformance.suite"):
            for name, value in vars(klass).items():
                if name.startswith("test_") and inspect.isfunction(value):
                    tests[name] = value
    return tests


def defining_group(cls: type, name: str) -> type | None:
    """The suite group class that defines standard test ``name`` for ``cls``."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("skyrl_backends.conformance.suite") and name in vars(klass):
            return klass
    return None


def feature_of(item: pytest.Item) -> tuple[str, str]:
    """(group name, parity-table row) of a collected test."""
    name = getattr(item, "originalname", item.name)
    group = defining_group(item.cls, name) if getattr(item, "cls", None) else None
    default = getattr(group, "feature_row", None) or getattr(item.cls, "feature_row", "Other")
    row = feature_of_function(getattr(item, "function", None), default)
    return (group.__name__ if group else item.cls.__name__), row
