# Two commands on a fresh machine: `make demo` and `make test`. Every other target is a step of those.
# Engines whose dependencies conflict live in separate virtual environments under .venv/.

PYTHON ?= python3
VENV := .venv
MODEL := .cache/tiny-model
BACKEND ?= transformers
# CPU torch; on this project's machines it comes from the local wheel folder (pip's find-links there;
# the uv workspace names the folder as its `torch-cpu` index, pyproject.toml).
TORCH := torch==2.13.0
TORCH_WHEELS := /opt/wheels
PIP := -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

CORE_ENV := $(VENV)/core
TF_ENV := $(VENV)/transformers
VLLM_ENV := $(VENV)/vllm
SGLANG_ENV := $(VENV)/sglang

# The environments come from the uv workspace (pyproject.toml) and its lockfile (uv.lock): one extra
# per environment, `uv sync --extra <env>` into .venv/<env>, workspace packages editable. uv is the
# one on PATH, else the pinned release that pip installs into .venv/uv. Measured on this project's
# 2-core machine with cold caches (docs/packaging.md): core, transformers and vLLM environments in
# under 2 minutes with uv against over 9 with pip.
UV_VERSION := 0.13.9
UV ?= $(or $(shell command -v uv 2>/dev/null),$(VENV)/uv/bin/uv)
export UV_PYTHON_DOWNLOADS := never
# Every environment is rebuilt when these change (before the fragments: their rules need it).
WORKSPACE := pyproject.toml uv.lock
# Syncs the workspace extra $(1) into .venv/$(1). Without --locked: a pyproject.toml changed without
# `make lock` is re-locked here, keeping every other pin, instead of failing.
uv_sync = UV_PROJECT_ENVIRONMENT=$(abspath $(VENV)/$(1)) $(UV) sync -q --python $(PYTHON) --extra $(1)
# Packages outside the lock that a fragment adds to an environment (prefer adding them to its extra).
uv_pip_extra = $(if $(strip $(2)),$(UV) pip install -q --python $(1)/bin/python $(2))

.PHONY: demo test test-full print-test-targets test-core test-transformers test-conformance envs model lock clean

# Each feature area adds its own targets in mk/<area>.mk: extra test targets to EXTRA_TESTS, and the
# slower variants that `make test` leaves out for CI's time (docs/testing.md) to FULL_TESTS. Packages
# belong in the environment's extra in pyproject.toml; TF_EXTRA_PIP / TF_EXTRA_EDITABLE /
# CORE_EXTRA_PIP still add unlocked ones on top.
EXTRA_TESTS :=
FULL_TESTS :=
TF_EXTRA_PIP :=
TF_EXTRA_EDITABLE :=
CORE_EXTRA_PIP :=
-include mk/*.mk

demo: $(DEMO_READY) $(MODEL)/.skyrl_tiny_model
	$(DEMO_ENV)/bin/python -m skyrl_rl_demo --backend $(BACKEND) --model $(MODEL) --out $(DEMO_OUT) $(DEMO_ARGS)

TEST_TARGETS = test-core test-transformers test-conformance $(EXTRA_TESTS)
test: $(TEST_TARGETS)

# Everything: `make test` and the variants it leaves out for CI's time (docs/testing.md).
test-full: test $(FULL_TESTS)

# For scripts/ci/time_targets.sh: the targets of `make test`, in order.
print-test-targets:
	@echo $(TEST_TARGETS)

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
$(VENV)/uv/bin/uv:
	rm -rf $(VENV)/uv && $(PYTHON) -m venv $(VENV)/uv
	$(VENV)/uv/bin/python $(PIP) uv==$(UV_VERSION)

$(CORE_ENV)/.ready: $(WORKSPACE) core/pyproject.toml | $(UV)
	$(call uv_sync,core)
	$(call uv_pip_extra,$(CORE_ENV),$(CORE_EXTRA_PIP))
	touch $@

$(TF_ENV)/.ready: $(WORKSPACE) core/pyproject.toml plugins/transformers_backend/pyproject.toml \
		examples/minimal_backend/pyproject.toml examples/rl_demo/pyproject.toml | $(UV)
	$(call uv_sync,transformers)
	$(call uv_pip_extra,$(TF_ENV),$(foreach p,$(TF_EXTRA_EDITABLE),-e $(p)) $(TF_EXTRA_PIP))
	touch $@

# Re-resolve the lockfile after changing a pyproject.toml (keeps every pin it can).
lock: | $(UV)
	$(UV) lock

envs: $(CORE_ENV)/.ready $(TF_ENV)/.ready

clean:
	rm -rf $(VENV) .cache
