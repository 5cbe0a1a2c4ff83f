"""The module ``skyrl-backends conformance BACKEND`` hands to pytest: the whole suite, for the
backend given on the command line, with no test code of the backend author's own."""

from skyrl_backends.conformance import BackendConformanceSuite


class TestConformance(BackendConformanceSuite):
    """Backend, model and options come from --conformance-backend and friends."""
