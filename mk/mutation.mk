# Mutation testing of the conformance suite. `make mutation` injects one bug at a time into a copy of
# the reference backend (scripts/mutation/mutants.py), runs the whole suite against each copy and
# prints caught / total with the tests that caught each bug; docs/conformance.md records a run. It
# takes about as many minutes as there are mutants on 2 cores, so it is not part of `make test`;
# the tool's own checks (every mutant still applies to the backend's source) are.
EXTRA_TESTS += test-mutation-tool

MUTATION_OUT := .cache/mutation
# e.g. MUTATION_ARGS="--only top_p_ignored seed_ignored"
MUTATION_ARGS ?=

.PHONY: mutation test-mutation-tool

mutation: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python scripts/mutation/run.py \
		--model $(MODEL) --out $(MUTATION_OUT) $(MUTATION_ARGS)

test-mutation-tool: $(CORE_ENV)/.ready
	$(CORE_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/mutation
