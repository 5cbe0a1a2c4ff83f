"""The example backend (examples/minimal_backend) against the conformance suite, the repository's
way (`pytest tests/conformance --backend minimal`); CI runs it the walk-through's way instead
(`make test-conformance-example`)."""

from skyrl_backends.conformance import BackendConformanceSuite


class TestMinimalConformance(BackendConformanceSuite):
    backend = "minimal"
    expected_failures: dict[str, str] = {}
