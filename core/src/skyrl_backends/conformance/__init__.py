"""The conformance suite: what a backend author runs to prove parity with the other backends.

Switch it on from a ``conftest.py`` and subclass the bundle in a test module::

    # conftest.py
    pytest_plugins = ["skyrl_backends.conformance.pytest_plugin"]

    # test_conformance.py
    from skyrl_backends.conformance import BackendConformanceSuite

    class TestMyBackend(BackendConformanceSuite):
        backend = "mybackend"                    # the entry-point name
        engine_options = {"dtype": "float32"}     # passed to create_engine
        expected_failures = {}                    # {"test_name": "reason"} for known gaps

or run it with no test code at all: ``skyrl-backends conformance mybackend --model DIR``.

Tests needing a capability the backend declares absent are reported *unsupported (declared)*
naming it; a declared capability that does not work fails. Log-probabilities and greedy output are
checked against an independent float32 transformers reference (:mod:`.oracles`). ``--conformance-report
FILE`` writes the JSON report that :mod:`.parity` turns into ``docs/parity.md``.

Needs the ``testing`` extra (torch, transformers, peft) in the backend's environment, for the
reference model and the tiny test model.
"""

from skyrl_backends.conformance.config import ConformanceConfig
from skyrl_backends.conformance.markers import UNSUPPORTED_PREFIX, feature, requires
from skyrl_backends.conformance.suite import (
    GROUPS,
    AbortPauseTests,
    BackendConformanceSuite,
    ConcurrencyTests,
    ConformanceTestBase,
    GenerationContractTests,
    LifecycleStateMachine,
    LogprobTests,
    LoraTests,
    PrefixCacheTests,
    SamplingParamsTests,
    SleepWakeTests,
    StopConditionTests,
    WeightSyncTests,
    feature_rows,
)

__all__ = [
    "GROUPS", "UNSUPPORTED_PREFIX", "AbortPauseTests", "BackendConformanceSuite", "ConcurrencyTests",
    "ConformanceConfig", "ConformanceTestBase", "GenerationContractTests", "LifecycleStateMachine", "LogprobTests",
    "LoraTests", "PrefixCacheTests", "SamplingParamsTests", "SleepWakeTests", "StopConditionTests",
    "WeightSyncTests", "feature", "feature_rows", "requires",
]
