# Weight sync: every weight-sync test lives in tests/weight_sync (the wire format and each transport's
# validation, and trainer and engine processes exchanging weights over shared memory and a gloo
# broadcast, against real engines).
EXTRA_TESTS += test-weight-sync

.PHONY: test-weight-sync bench-weight-sync

test-weight-sync: $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) $(TF_ENV)/bin/python -m pytest -q tests/weight_sync

# Not a test: prints the strategies' timings against baselines measured in the same run.
bench-weight-sync: $(TF_ENV)/.ready
	$(TF_ENV)/bin/python core/benchmarks/bench_weight_sync.py --mode cpu

# Not a test: a model sharded over two FSDP2 ranks against it unsharded, and a LoRA-only sync against
# a full one (CPU; `--device cuda` on a machine with two GPUs).
.PHONY: bench-trainer-side
bench-trainer-side: $(TF_ENV)/.ready
	$(TF_ENV)/bin/python core/benchmarks/bench_trainer_side.py --part sharded
	$(TF_ENV)/bin/python core/benchmarks/bench_trainer_side.py --part lora

# The same cross-process tests with vLLM-CPU engines (one engine process; vLLM's start-up dominates),
# and the trainer's side: a trainer sharded over two ranks, LoRA adapters from tensors. In `make
# test-full`, not `make test` (3.5-5 minutes on the 2-core machine, docs/testing.md): test-vllm
# covers the strategies into vLLM's workers and the conformance suite refused updates on vLLM.
FULL_TESTS += test-weight-sync-vllm
.PHONY: test-weight-sync-vllm
test-weight-sync-vllm: $(VLLM_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) SKYRL_WEIGHT_SYNC_BACKEND=vllm SKYRL_WEIGHT_SYNC_ENGINES=1 \
		$(VLLM_ENV)/bin/python -m pytest -q tests/weight_sync/test_cross_process.py tests/weight_sync/test_trainer_side.py
