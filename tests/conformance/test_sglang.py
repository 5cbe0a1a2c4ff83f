"""The sglang backend against the conformance suite (run in its own environment:
`pytest tests/conformance --backend sglang`).

Known gaps go in `expected_failures` with a reason; a standard test is never deleted.
"""

from skyrl_backends.conformance import BackendConformanceSuite


class TestSGLangConformance(BackendConformanceSuite):
    backend = "sglang"
    engine_options: dict = {}
    expected_failures: dict[str, str] = {}
