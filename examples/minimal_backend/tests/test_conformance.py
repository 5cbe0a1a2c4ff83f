from skyrl_backends.conformance import BackendConformanceSuite


class TestMinimalBackend(BackendConformanceSuite):
    backend = "minimal"
