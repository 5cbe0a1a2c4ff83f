"""The conformance suite's test groups and the class that bundles them.

Each group is a plain class whose name does not start with ``Test``, so pytest collects nothing
until a backend's test module subclasses it (usually :class:`BackendConformanceSuite`, which
bundles every group)::

    from skyrl_backends.conformance import BackendConformanceSuite

    class TestMyBackend(BackendConformanceSuite):
        backend = "mybackend"
"""

from __future__ import annotations

from skyrl_backends.conformance.suite.abort_pause import AbortPauseTests
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.concurrency import ConcurrencyTests
from skyrl_backends.conformance.suite.generation import GenerationContractTests
from skyrl_backends.conformance.suite.inflight_update import InflightUpdateTests
from skyrl_backends.conformance.suite.lifecycle import LifecycleStateMachine
from skyrl_backends.conformance.suite.logprobs import LogprobTests
from skyrl_backends.conformance.suite.lora import LoraTests
from skyrl_backends.conformance.suite.prefix_cache import PrefixCacheTests
from skyrl_backends.conformance.suite.sampling import SamplingParamsTests
from skyrl_backends.conformance.suite.sleep_wake import SleepWakeTests
from skyrl_backends.conformance.suite.stopping import StopConditionTests
from skyrl_backends.conformance.suite.streaming import StreamingTests
from skyrl_backends.conformance.suite.tied_weights import TiedWeightsTests
from skyrl_backends.conformance.suite.weight_sync import WeightSyncTests

GROUPS: tuple[type[ConformanceTestBase], ...] = (
    GenerationContractTests,
    SamplingParamsTests,
    StopConditionTests,
    LogprobTests,
    SleepWakeTests,
    WeightSyncTests,
    LoraTests,
    PrefixCacheTests,
    AbortPauseTests,
    InflightUpdateTests,
    ConcurrencyTests,
    StreamingTests,
    LifecycleStateMachine,
    # Last: it stops the shared engine and runs one of its own, on another model.
    TiedWeightsTests,
)


class BackendConformanceSuite(*GROUPS):  # type: ignore[misc]
    """Every conformance test group. Subclass it, set ``backend``, and pytest runs the lot."""


def feature_rows() -> list[str]:
    """Parity-table rows in suite order (the order of groups, then of tests within a group)."""
    from skyrl_backends.conformance.markers import feature_of_function

    rows: list[str] = []
    for group in GROUPS:
        for name, value in vars(group).items():
            if not name.startswith("test_"):
                continue
            row = feature_of_function(value, group.feature_row)
            if row not in rows:
                rows.append(row)
    return rows


__all__ = ["GROUPS", "BackendConformanceSuite", "ConformanceTestBase", "feature_rows", *(g.__name__ for g in GROUPS)]
