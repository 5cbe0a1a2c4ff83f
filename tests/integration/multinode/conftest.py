"""The multi-node Ray test runs in a pytest process of its own: it connects this process to a
simulated cluster, and a process joins one Ray cluster for its life."""

pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir
