# The SGLang backend. Its pure parts (translation, log-probabilities, logit processor, stop strings,
# hooks) are unit-tested in the transformers environment without SGLang: `test-sglang-unit`. The real
# engine runs in its own environment (.venv/sglang, sglang==0.5.23 from PyPI, about 10 GB: CUDA wheels
# included since SGLang pins a CUDA torch) on the CPU:
# `test-sglang-cpu` (the plugin's smoke tests, about 75 s) and `conformance-sglang-cpu` (the shared
# suite, about 45 s). All three are in `make test` (about 6 minutes together on an idle machine; drop
# the second line below to keep only the unit tests). The GPU authority is SGLang 0.5.17 on the GPU
# machine (docs/parity.md). The environment is the workspace's `sglang` extra (uv.lock): uv builds it in
# about a minute, PyPI's CUDA torch and libraries included (docs/packaging.md).
EXTRA_TESTS += test-sglang-unit
EXTRA_TESTS += test-sglang-cpu conformance-sglang-cpu

# Test-only import hook (a sitecustomize) that keeps sgl-kernel's CUDA-only ops from loading on a
# machine without a CUDA driver; only these targets put it on PYTHONPATH.
SGLANG_CPU_HOOK := plugins/sglang_backend/tests/cpu/hook
SGLANG_CPU_RUN := SKYRL_TEST_MODEL=$(abspath $(MODEL)) PYTHONPATH=$(abspath $(SGLANG_CPU_HOOK)) SGLANG_USE_CPU_ENGINE=1

.PHONY: test-sglang-unit test-sglang-cpu conformance-sglang-cpu

$(SGLANG_ENV)/.ready: $(WORKSPACE) core/pyproject.toml plugins/sglang_backend/pyproject.toml mk/sglang.mk | $(UV)
	$(call uv_sync,sglang)
	touch $@

test-sglang-unit: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) PYTHONPATH=plugins/sglang_backend/src \
		$(TF_ENV)/bin/python -m pytest -q plugins/sglang_backend/tests/unit

test-sglang-cpu: $(SGLANG_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(SGLANG_CPU_RUN) $(SGLANG_ENV)/bin/python -m pytest -q plugins/sglang_backend/tests/cpu

conformance-sglang-cpu: $(SGLANG_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(SGLANG_CPU_RUN) $(SGLANG_ENV)/bin/python -m pytest -q tests/conformance --backend sglang \
		--conformance-report $(CONFORMANCE_OUT)/sglang-cpu.json
