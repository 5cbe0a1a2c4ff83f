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

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use, so that `skyrl-backends` (which looks for this package's CLI)
# starts without torch, and pytest can rewrite the suite's asserts when its plugin loads first.
_EXPORTS = {
    "ConformanceConfig": "skyrl_backends.conformance.config",
    "UNSUPPORTED_PREFIX": "skyrl_backends.conformance.markers",
    "feature": "skyrl_backends.conformance.markers",
    "requires": "skyrl_backends.conformance.markers",
    **{name: "skyrl_backends.conformance.suite" for name in (
        "GROUPS", "AbortPauseTests", "BackendConformanceSuite", "ConcurrencyTests", "ConformanceTestBase",
        "GenerationContractTests", "LifecycleStateMachine", "LogprobTests", "LoraTests", "PrefixCacheTests",
        "SamplingParamsTests", "SleepWakeTests", "StopConditionTests", "WeightSyncTests", "feature_rows")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
