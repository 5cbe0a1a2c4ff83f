# The RL demo (`make demo`) and its test. The trainer is the package examples/rl_demo
# (skyrl-rl-demo), installed editable into every engine's environment (their extras in pyproject.toml).
#
# `make demo` runs in the environment of the backend it names: .venv/<BACKEND> when that exists
# (built by the backend's own fragment, e.g. `make .venv/vllm/.ready`); otherwise the transformers
# environment. DEMO_ARGS passes more options to the trainer, e.g. `make demo DEMO_ARGS="--steps 50 --seed 1"`.
EXTRA_TESTS += test-demo

DEMO_OUT ?= out/demo
DEMO_ARGS ?=
DEMO_ENV := $(TF_ENV)
DEMO_READY := $(TF_ENV)/.ready
ifneq ($(filter-out transformers,$(BACKEND)),)
ifneq ($(wildcard $(VENV)/$(BACKEND)/bin/python),)
DEMO_ENV := $(VENV)/$(BACKEND)
DEMO_READY := $(DEMO_ENV)/.ready
endif
endif

.PHONY: test-demo

test-demo: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q examples/rl_demo/tests
