"""The reference backend (HF transformers) against the conformance suite."""

from skyrl_backends.conformance import BackendConformanceSuite


class TestTransformersConformance(BackendConformanceSuite):
    backend = "transformers"
    engine_options = {"dtype": "float32", "device": "cpu"}
    expected_failures: dict[str, str] = {}
