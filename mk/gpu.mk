# The GPU proofs run on the lent GPU machine with scripts/gpu/run_on_gpu.sh (docs/gpu.md); their
# helpers are checked here, on the CPU, so that each scarce call there works on the first try.
EXTRA_TESTS += test-gpu-scripts

.PHONY: test-gpu-scripts

test-gpu-scripts: $(CORE_ENV)/.ready $(TF_ENV)/.ready
	$(CORE_ENV)/bin/python -m pytest -q tests/gpu_scripts
