# Two commands on a fresh machine: `make demo` and `make test`. Every other target is a step of those.
# Engines whose dependencies conflict live in separate virtual environments under .venv/.

PYTHON ?= python3
VENV := .venv
MODEL := .cache/tiny-model
BACKEND ?= transformers
# CPU torch; on this project's machines it comes from the local wheel folder.
TORCH := torch==2.13.0
PIP := -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

CORE_ENV := $(VENV)/core
TF_ENV := $(VENV)/transformers
VLLM_ENV := $(VENV)/vllm
SGLANG_ENV := $(VENV)/sglang

.PHONY: demo test test-core test-transformers test-conformance envs model clean

# Each feature area adds its own targets in mk/<area>.mk: extra test targets to EXTRA_TESTS,
# extra packages for the transformers environment to TF_EXTRA_PIP / TF_EXTRA_EDITABLE.
EXTRA_TESTS :=
TF_EXTRA_PIP :=
TF_EXTRA_EDITABLE :=
CORE_EXTRA_PIP :=
-include mk/*.mk

demo: $(DEMO_READY) $(MODEL)/.skyrl_tiny_model
	$(DEMO_ENV)/bin/python -m skyrl_rl_demo --backend $(BACKEND) --model $(MODEL) --out $(DEMO_OUT) $(DEMO_ARGS)

test: test-core test-transformers test-conformance $(EXTRA_TESTS)

test-core: $(CORE_ENV)/.ready
	$(CORE_ENV)/bin/python -m pytest -q core/tests

test-transformers: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q plugins/transformers_backend/tests

test-conformance: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q tests/conformance --backend transformers

model: $(MODEL)/.skyrl_tiny_model

$(MODEL)/.skyrl_tiny_model: $(TF_ENV)/.ready core/src/skyrl_backends/testing/tiny_model.py
	$(TF_ENV)/bin/skyrl-backends make-tiny-model $(MODEL)

# -- environments -------------------------------------------------------------------------------
$(CORE_ENV)/.ready: core/pyproject.toml
	rm -rf $(CORE_ENV) && $(PYTHON) -m venv $(CORE_ENV)
	$(CORE_ENV)/bin/python $(PIP) $(TORCH)
	$(CORE_ENV)/bin/python $(PIP) -e 'core[dev,torch,http,ray]' $(CORE_EXTRA_PIP)
	touch $@

$(TF_ENV)/.ready: core/pyproject.toml plugins/transformers_backend/pyproject.toml
	rm -rf $(TF_ENV) && $(PYTHON) -m venv $(TF_ENV)
	$(TF_ENV)/bin/python $(PIP) $(TORCH)
	$(TF_ENV)/bin/python $(PIP) -e 'core[dev,testing,http,ray]' -e plugins/transformers_backend \
		$(foreach p,$(TF_EXTRA_EDITABLE),-e $(p)) $(TF_EXTRA_PIP)
	touch $@

envs: $(CORE_ENV)/.ready $(TF_ENV)/.ready

clean:
	rm -rf $(VENV) .cache
