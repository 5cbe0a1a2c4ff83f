"""The vllm backend against the conformance suite (run in its own environment:
`pytest tests/conformance --backend vllm`).

Known gaps go in `expected_failures` with a reason; a standard test is never deleted.
"""

from skyrl_backends.conformance import BackendConformanceSuite


class TestVLLMConformance(BackendConformanceSuite):
    backend = "vllm"
    engine_options: dict = {}
    expected_failures: dict[str, str] = {}
