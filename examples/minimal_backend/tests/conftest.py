# Switch the skyrl_backends conformance suite on for this test folder.
pytest_plugins = ["skyrl_backends.conformance.pytest_plugin"]
