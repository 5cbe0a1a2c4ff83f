# Trainer/engine log-probability consistency (docs/consistency.md). Each backend is measured again in
# its own environment (tests/consistency), then every fresh report is held against the committed one
# of its column and the table against the committed reports.
#
# CI measures the default column of each CPU backend, all lengths for transformers and vLLM; SGLang's
# CPU path takes minutes for 1000-token responses, so CI measures its 32- and 256-token rollouts and
# holds them against the committed numbers of those lengths. `make consistency` measures every CPU
# column in full (variants included) and writes the committed reports and the table. GPU columns
# come from scripts/gpu/run_on_gpu.sh consistency:ENGINE (docs/gpu.md).
# Cost measured on the 2-core CPU machine (2026-12-03, shared with other jobs, load 8 to 30): CPU time
# 94 s for transformers (two columns), 117 s for vLLM, 111 s for SGLang, about 5.5 minutes together;
# wall 70 s for transformers and 65-90 s for vLLM when the machine was nearly idle.
EXTRA_TESTS += test-consistency-transformers test-consistency-vllm test-consistency-sglang test-consistency-table

CONSISTENCY_OUT := .cache/consistency
CONSISTENCY_DIR := docs/consistency
CONSISTENCY_DOC := docs/consistency.md
CONSISTENCY_SGLANG_CI_LENGTHS := 32x8,256x4
CONSISTENCY_PYTEST = -m pytest -q -p no:cacheprovider tests/consistency

.PHONY: test-consistency-transformers test-consistency-vllm test-consistency-sglang test-consistency-table \
	consistency consistency-table

# Each target first drops its backend's reports of an earlier run, which the table check would read.
test-consistency-transformers: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	rm -f $(CONSISTENCY_OUT)/transformers-*.json
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend transformers --consistency-report-dir=$(CONSISTENCY_OUT)

test-consistency-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	rm -f $(CONSISTENCY_OUT)/vllm-*.json
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend vllm --consistency-report-dir=$(CONSISTENCY_OUT) -k default

test-consistency-sglang: $(SGLANG_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	rm -f $(CONSISTENCY_OUT)/sglang-*.json
	$(SGLANG_CPU_RUN) $(SGLANG_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend sglang --consistency-report-dir=$(CONSISTENCY_OUT) -k default \
		--consistency-lengths $(CONSISTENCY_SGLANG_CI_LENGTHS)

test-consistency-table: test-consistency-transformers test-consistency-vllm test-consistency-sglang
	$(TF_ENV)/bin/python -m skyrl_backends.consistency.table check $(CONSISTENCY_DOC) \
		$(wildcard $(CONSISTENCY_DIR)/*.json) --fresh $(wildcard $(CONSISTENCY_OUT)/*.json)

# Measure every CPU column in full into the committed reports, then regenerate the table (GPU
# reports as committed).
consistency: $(TF_ENV)/.ready $(VLLM_ENV)/.ready $(SGLANG_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend transformers --consistency-report-dir=$(CONSISTENCY_DIR)
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend vllm --consistency-report-dir=$(CONSISTENCY_DIR)
	$(SGLANG_CPU_RUN) $(SGLANG_ENV)/bin/python $(CONSISTENCY_PYTEST) \
		--consistency-backend sglang --consistency-report-dir=$(CONSISTENCY_DIR)
	$(MAKE) consistency-table

# Re-render the table from the committed reports only (after adding a GPU column's report).
consistency-table: $(TF_ENV)/.ready
	$(TF_ENV)/bin/python -m skyrl_backends.consistency.table generate $(CONSISTENCY_DIR)/*.json -o $(CONSISTENCY_DOC)
