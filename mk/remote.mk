# Engines as servers and beyond one machine (issue 18): the remote engine against a real engine behind
# the engine API, the conformance suite through the wire (the parity table's transformers-remote
# column, checked by test-parity-table), and engines as Ray actors on a simulated multi-node cluster.
# The client tests (mk/client.mk) also run on remote engines.
# test-multinode takes about 40 s on a quiet 2-core machine (3.5 minutes with three busy processes
# beside it). Its node is removed while the client is paused with requests held on the victim, so a
# loaded machine cannot let the victim finish its share first (it once did, with a fixed wait).
EXTRA_TESTS += test-remote test-conformance-remote test-multinode

.PHONY: test-remote test-conformance-remote test-multinode bench-remote

test-remote: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/integration/remote

# Every engine of the suite is a `skyrl-backends serve` process on loopback driven by RemoteEngine;
# the report lands in $(CONFORMANCE_OUT)/transformers-remote.json for test-parity-table.
test-conformance-remote: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/conformance \
		--backend transformers --conformance-remote

test-parity-table: test-conformance-remote

# Its own pytest process: the test joins this process to a simulated Ray cluster for its life.
test-multinode: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/integration/multinode

# Not tests: remote generate vs in process, remote weight sync vs raw gloo, recovery after a node loss.
bench-remote: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(TF_ENV)/bin/python benchmarks/remote/bench_remote.py generate --model $(MODEL)
	$(TF_ENV)/bin/python benchmarks/remote/bench_remote.py weight-sync --shape qwen2.5-0.5b
	$(TF_ENV)/bin/python benchmarks/remote/bench_remote.py recovery --model $(MODEL)

# vLLM-CPU through the wire: the vllm-remote column (not in `make test`: every vLLM engine the suite
# starts is a serve process, which roughly doubles test-vllm's conformance time). Commit the report
# and re-render the table with `make parity-table`.
.PHONY: conformance-vllm-remote
conformance-vllm-remote: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_ENV)/bin/python -m pytest -q \
		-p no:cacheprovider tests/conformance --backend vllm --conformance-remote \
		--conformance-report $(PARITY_DIR)/vllm-remote.json
