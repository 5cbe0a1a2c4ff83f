#!/usr/bin/env bash
# The project's GPU proofs, run on the lent GPU machine (the device tool) from the repository root:
#
#   scripts/gpu/run_on_gpu.sh STEP[@SECONDS] ...
#
# Steps run in order, each bounded by `timeout` (default limits below, or @SECONDS); the whole log
# goes to $OUT/log and results to $OUT/*.json (the device tool brings back at most 8 files).
#
#   probe                     the GPU, Python and the packages the suite needs -> $OUT/probe.txt
#   stage:ENGINE              keep this call's carried parts .gpu/ENGINE/part* in /tmp/stage/ENGINE: an
#                             engine travels in parts, one per call, and the machine keeps /tmp while warm
#   model                     a random Qwen2.5-1.5B-shaped model in /tmp/models (make_random_qwen.py)
#   conformance:ENGINE        tests/conformance --backend ENGINE -> $OUT/ENGINE-gpu.json (more options:
#                             CONFORMANCE_OPTIONS="--conformance-engine-option KEY=VALUE ...")
#   server-conformance:ENGINE the same suite against ENGINE's own, unmodified server (vllm serve, SGLang's
#                             launch_server) driven through its HTTP API -> $OUT/ENGINE-server.json (the
#                             parity table's ENGINE-server column; the vllm one also runs on CPU in CI)
#   generate:ENGINE           generation benchmark, plugin vs the engine's own API -> $OUT/ENGINE-generate-HHMMSS.json
#                             (GENERATE_REPEATS timed runs of each side, default 7; GENERATE_ARGS adds options,
#                             e.g. "--decompose" for sglang; GENERATE_ENGINE_KWARGS
#                             replaces the engine_init_kwargs, e.g. '{}' for vLLM with CUDA graphs)
#   diagnose:ENGINE           diagnose_logprobs.py with the conformance options -> $OUT/ENGINE-logprobs.json;
#                             for vllm also with the V1 model runner -> $OUT/vllm-logprobs-v1.json
#   consistency:ENGINE        tests/consistency in bfloat16, every column of ENGINE (plain, fp32 LM head,
#                             batch-invariant / deterministic) -> $OUT/consistency/ENGINE-gpu-bf16*.json; a
#                             column whose option the staged build lacks is left out, with a log line
#   weight-sync:ENGINE        core/benchmarks/bench_weight_sync.py, GPU mode, into ENGINE
#                             (with 2 GPUs also NCCL broadcast) -> $OUT/ENGINE-weight-sync-HHMMSS.json
#   wake-cycle:ENGINE         core/benchmarks/bench_wake_cycle.py: sleep -> wake(weights) -> sync -> wake(kv_cache)
#                             -> first token through skyrl vs the engine's own calls (issue 23, P4), the
#                             1.5B-shaped random model -> $OUT/ENGINE-wake-cycle-HHMMSS.json
#   colocated                 the same benchmark's colocated cases without an engine (copy floor, warm and
#                             adopted CUDA IPC; core only, nothing staged) -> $OUT/colocated-HHMMSS.json;
#                             pool the JSON of several calls with core/benchmarks/pool_weight_sync.py
#   apply-copy                core/benchmarks/bench_apply_copy.py: ways to copy a received update into the
#                             engine's parameters (one foreach copy, a copy per tensor, split by size)
#                             against one copy of the same bytes (core only) -> $OUT/apply-copy-HHMMSS.json;
#                             APPLY_COPY_ARGS adds options, e.g. "--split-bytes 4194304"
#   weight-sync-tests[:ENGINE] tests/weight_sync/test_gpu.py with ENGINE on the path (without ENGINE: the
#                             core only, engine tests skipped; PYTEST_ARGS adds pytest options, e.g.
#                             "-k other_gpu"); SKYRL_ENGINE_DEFAULTS, if set, replaces the engine defaults below
#   trainer-side:ENGINE       core/benchmarks/bench_trainer_side.py: a Qwen2.5-1.5B-shaped model sharded with
#                             FSDP2 over 2 GPUs (NCCL) against it unsharded, by CUDA IPC and NCCL broadcast
#                             into an engine process on GPU 1 (needs 2 GPUs) -> $OUT/trainer-side.json
#   broadcast                 bench_weight_sync.py GPU mode without an engine (NCCL needs 2 GPUs);
#                             BROADCAST_ARGS adds options, e.g. "--repeats 20 --skip colocated,per_tensor"
#   async-rl:ENGINE           examples/rl_demo/benchmarks/bench_async.py: the RL demo on ENGINE, trainer on
#                             the GPU, synchronous vs asynchronous steps/s at equal reward ->
#                             $OUT/ENGINE-async-rl.json (ASYNC_RL_ARGS adds options, e.g. "--steps 80")
#   pause:ENGINE              pausing under a decoding request through skyrl vs the engine's own calls, the tiny
#                             model: vllm plugins/vllm_backend/benchmarks/bench_update_under_load.py (keep, abort,
#                             a whole update), sglang plugins/sglang_backend/benchmarks/bench_pause.py (abort,
#                             keep) -> $OUT/ENGINE-pause-HHMMSS.json
#   rl-model                  a random Qwen2.5-1.5B-shaped model with the test tokenizer's vocabulary, the
#                             RL demo's task needs it (make_random_qwen.py --tokenizer-vocab) in /tmp/models
#   rl-step:ENGINE            examples/rl_demo/benchmarks/bench_step.py (issue 23, P8): the demo's colocated
#                             step through skyrl vs the same step on ENGINE's own calls, that model, trainer
#                             on the GPU -> $OUT/ENGINE-rl-step-HHMMSS.json; RL_STEP_ARGS adds options, and
#                             when unset is "--lr 5e-6 --entropy-coef 0.1" (that model learns the task with them; at the
#                             demo's defaults its policy collapses early)
#   bundle                    every result in $OUT so far (all but logs and earlier bundles) into one
#                             $OUT/results-HHMMSS.tgz, the files removed: a call of many steps then
#                             brings all of them back within the device tool's 8 files (make it last)
#
# ENGINE is vllm or sglang (the builds of ../shared/gpu/stage.py); engine steps unpack the staged
# parts once into /tmp/ENGINEsite. Nothing is installed: the project runs from its source folders, and
# scripts/gpu/write_dist_info.py gives them the entry points an installation would have.
#
# Run from a committed snapshot (`git archive HEAD | tar -x -C .gpu/src`, carried) so that results
# belong to a commit: `cd .gpu/src && ASSETS=../.. scripts/gpu/run_on_gpu.sh ...`. ASSETS is the
# folder holding the ignored things a call carries: .gpu/ENGINE/part*, .whl/, .cache/tiny-model.
# The snapshot has no git: write its commit into .gpu/src/COMMIT (`git rev-parse --short HEAD`), which
# the benchmarks record as SKYRL_COMMIT.
set -uo pipefail

REPO=$(pwd)
ASSETS=$(cd "${ASSETS:-.}" && pwd)
OUT=${OUT:-$REPO/out/gpu}
MODEL15=/tmp/models/qwen2.5-1.5b-random
RL_MODEL=/tmp/models/qwen2.5-1.5b-random-rl
RL_STEP_LEARNING="--lr 5e-6 --entropy-coef 0.1"  # rl-step's learning settings for that model
TINY=/tmp/tiny-model
mkdir -p "$OUT"
[ -z "${SKYRL_COMMIT:-}" ] && [ -f "$REPO/COMMIT" ] && SKYRL_COMMIT=$(cat "$REPO/COMMIT")
export SKYRL_COMMIT=${SKYRL_COMMIT:-}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not in the vLLM build
# NVLink multicast stays off (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SKYRL_TEST_MODEL=$TINY
# Engines started by code that takes no engine options (see with_engine_defaults.py): vLLM without
# torch.compile (starts faster; weight loading is the same), SGLang with the kernels the build has.
SGLANG_KERNELS='"attention_backend": "triton", "sampling_backend": "pytorch", "disable_cuda_graph": true'
export SKYRL_ENGINE_DEFAULTS=${SKYRL_ENGINE_DEFAULTS:-"{\"vllm\": {\"engine_init_kwargs\": {\"enforce_eager\": true}},
  \"sglang\": {\"engine_init_kwargs\": {$SGLANG_KERNELS}}}"}

WHEELS=
declare -A LIMIT=([probe]=60 [stage]=60 [model]=120 [conformance]=330 [server-conformance]=480 [generate]=200
                  [weight-sync]=400 [wake-cycle]=300 [colocated]=150 [apply-copy]=60
                  [weight-sync-tests]=200 [broadcast]=150 [diagnose]=300 [consistency]=540 [async-rl]=540
                  [trainer-side]=400 [rl-model]=120 [rl-step]=540 [pause]=200)

log() { echo "=== $(date -u +%H:%M:%S) $*"; }

bounded() {  # SECONDS CMD...: SIGINT first (pytest then still writes its report), KILL 45 s later
    local seconds=$1; shift
    timeout -s INT -k 45 "$seconds" "$@"
}

stage() {  # ENGINE
    mkdir -p "/tmp/stage/$1"
    for part in "$ASSETS"/.gpu/"$1"/part*; do
        [ -f "$part" ] && cp "$part" "/tmp/stage/$1/" && log "staged $part"
    done
    ls -l "/tmp/stage/$1"
}

unpack() {  # ENGINE -> /tmp/ENGINEsite (once per machine)
    local site=/tmp/${1}site
    stage "$1" >/dev/null
    [ -f "$site/.complete" ] && return 0
    log "unpacking $1 from $(ls /tmp/stage/"$1" | tr '\n' ' ')"
    rm -rf "$site" && mkdir -p "$site"
    cat /tmp/stage/"$1"/part* | xz -d -T4 | tar xf - -C "$site" || { log "unpack of $1 failed"; return 1; }
    touch "$site/.complete"
}

core_env() {
    prepare
    python3 scripts/gpu/write_dist_info.py /tmp/skyrl_dist/core core >/dev/null
    export PYTHONPATH=/tmp/skyrl_dist/core:$REPO/core/src${WHEELS:+:$WHEELS}
}

engine_env() {  # ENGINE: its unpacked build, the core and its plugin, discoverable by entry point
    prepare; unpack "$1" || return 1
    python3 scripts/gpu/write_dist_info.py "/tmp/skyrl_dist/$1" core "plugins/$1_backend" >/dev/null
    export PYTHONPATH=/tmp/${1}site:/tmp/skyrl_dist/$1:$REPO/core/src:$REPO/plugins/$1_backend/src${WHEELS:+:$WHEELS}
}

prepare() {  # once per machine: wheels carried in .whl/ (packages missing there), the tiny test model
    if compgen -G "$ASSETS/.whl/*.whl" >/dev/null && [ ! -d /tmp/wheels ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/wheels "$ASSETS"/.whl/*.whl
    fi
    [ -d /tmp/wheels ] && WHEELS=/tmp/wheels
    [ -d "$ASSETS/.cache/tiny-model" ] && [ ! -d $TINY ] && cp -r "$ASSETS/.cache/tiny-model" $TINY
    [ -d $TINY ] || log "no tiny model in $TINY: carry .cache/tiny-model once"
}

probe() {
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    nproc; free -g | head -2; df -h /tmp | tail -1
    python3 - <<'PY'
import sys, importlib.metadata as m
print("python", sys.version.split()[0])
for d in ["torch", "transformers", "tokenizers", "safetensors", "pytest", "pytest-timeout", "pytest-asyncio",
          "hypothesis", "pluggy", "PyYAML", "packaging", "psutil", "peft", "setuptools", "numpy", "triton"]:
    try:
        print(f"{d}=={m.version(d)}")
    except m.PackageNotFoundError:
        print(f"{d}: MISSING")
import torch
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(), torch.cuda.get_device_name(0))
PY
}

suite_kwargs() {  # ENGINE: engine_init_kwargs of the conformance runs
    case $1 in
        # the suite class's own options plus what a shared GPU needs: no compilation
        vllm) echo '{"distributed_executor_backend": "uni", "enforce_eager": true}' ;;
        sglang) echo "{$SGLANG_KERNELS}" ;;
    esac
}

conformance() {  # ENGINE SECONDS
    local options
    # bfloat16, not the suite classes' float32: on the GPU vLLM's LoRA kernels and SGLang's RMSNorm
    # kernel take half precision only (both seen failing in float32 there).
    options=$(suite_kwargs "$1")
    # -s: engine processes log straight to $OUT/log (an engine that kills its process group on a
    # failed start would otherwise take pytest's captured output with it)
    bounded "$2" python3 -m pytest -p no:cacheprovider -q -s -rfEs tests/conformance --backend "$1" \
        --timeout "$(( $2 - 60 ))" --conformance-report "$OUT/$1-gpu.json" \
        --conformance-engine-option gpu_memory_utilization=0.2 --conformance-engine-option dtype=bfloat16 \
        --conformance-engine-option "engine_init_kwargs=$options" ${CONFORMANCE_OPTIONS:-}
}

server_conformance() {  # ENGINE SECONDS: the suite against the engine's own server, same engine options
    local options
    options=$(suite_kwargs "$1")
    bounded "$2" python3 -m pytest -p no:cacheprovider -q -s -rfEs tests/conformance --backend "$1" \
        --conformance-server --timeout "$(( $2 - 60 ))" --conformance-report "$OUT/$1-server.json" \
        --conformance-engine-option gpu_memory_utilization=0.2 --conformance-engine-option dtype=bfloat16 \
        --conformance-engine-option "engine_init_kwargs=$options" ${CONFORMANCE_OPTIONS:-}
}

consistency() {  # ENGINE SECONDS: the consistency columns, with the conformance runs' engine options
    local options skip=() site=/tmp/${1}site
    options=$(suite_kwargs "$1")
    # Options checked against the staged build's own source: a column is measured only where its
    # option exists there (vLLM's fp32 head is read by its logits processor).
    if [ "$1" = vllm ]; then
        grep -q head_dtype "$site/vllm/model_executor/layers/logits_processor.py" 2>/dev/null \
            || { log "this vLLM build has no head_dtype in its logits processor: fp32-head column left out"; skip+=(fp32_head); }
        grep -q VLLM_BATCH_INVARIANT "$site/vllm/envs.py" 2>/dev/null \
            || { log "this vLLM build has no VLLM_BATCH_INVARIANT: batch-invariant column left out"; skip+=(batch_invariant); }
    fi
    local expr="" column select=()
    for column in "${skip[@]}"; do expr="${expr:+$expr and }not $column"; done
    [ -n "$expr" ] && select=(-k "$expr")
    bounded "$2" python3 -m pytest -p no:cacheprovider -q -s -rfEs tests/consistency --consistency-backend "$1" \
        --timeout "$(( $2 - 30 ))" --consistency-report-dir="$OUT/consistency" \
        --consistency-engine-option gpu_memory_utilization=0.2 \
        --consistency-engine-option "engine_init_kwargs=$options" "${select[@]}" ${CONSISTENCY_ARGS:-}
}

diagnose() {  # ENGINE SECONDS: the same engine options as conformance
    local options half
    options="{\"gpu_memory_utilization\": 0.2, \"engine_init_kwargs\": $(suite_kwargs "$1")}"
    [ "$1" = vllm ] && half=$(( $2 / 2 )) || half=$2
    bounded "$half" python3 scripts/gpu/diagnose_logprobs.py --backend "$1" --model $TINY \
        --engine-options "$options" --json "$OUT/$1-logprobs.json"
    # vLLM 0.26 runs this model on its V2 model runner; the V1 runner is the comparison.
    [ "$1" = vllm ] && VLLM_USE_V2_MODEL_RUNNER=0 bounded "$half" python3 scripts/gpu/diagnose_logprobs.py \
        --backend vllm --model $TINY --engine-options "$options" --json "$OUT/vllm-logprobs-v1.json"
    return 0
}

generate() {  # ENGINE SECONDS
    local bench=plugins/$1_backend/benchmarks/bench_generate.py kwargs
    [ -f "$bench" ] || { log "no $bench"; return 1; }
    case $1 in
        vllm) kwargs='{"enforce_eager": true}' ;;
        sglang) kwargs="{$SGLANG_KERNELS}" ;;
    esac
    kwargs=${GENERATE_ENGINE_KWARGS:-$kwargs}  # e.g. '{}' for vLLM with torch.compile and CUDA graphs
    bounded "$2" python3 "$bench" --model "$MODEL15" --prompts 256 --prompt-len 128 --max-tokens 128 --dtype bfloat16 \
        --gpu-memory-utilization 0.5 --engine-kwargs "$kwargs" --repeats "${GENERATE_REPEATS:-7}" ${GENERATE_ARGS:-} \
        --output "$OUT/$1-generate-$(date -u +%H%M%S).json"
}

pause_bench() {  # ENGINE SECONDS
    local out="$OUT/$1-pause-$(date -u +%H%M%S).json"
    case $1 in
        vllm) bounded "$2" python3 scripts/gpu/with_engine_defaults.py \
            plugins/vllm_backend/benchmarks/bench_update_under_load.py --model $TINY --gpu-memory-utilization 0.3 \
            --output "$out" ;;
        sglang) bounded "$2" python3 plugins/sglang_backend/benchmarks/bench_pause.py --model $TINY --device cuda \
            --dtype bfloat16 --max-model-len 1024 --engine-kwargs "{$SGLANG_KERNELS}" --output "$out" ;;
        *) log "no pause benchmark for $1"; return 1 ;;
    esac
}

run_step() {  # STEP[:ENGINE][@SECONDS]
    local spec=$1 name engine seconds
    seconds=${spec#*@}; [ "$seconds" = "$spec" ] && seconds=
    spec=${spec%@*}
    name=${spec%%:*}; engine=${spec#*:}; [ "$engine" = "$spec" ] && engine=
    seconds=${seconds:-${LIMIT[$name]:-120}}
    log "step $name ${engine:+($engine) }limit ${seconds}s"
    case $name in
        probe) prepare; probe | tee "$OUT/probe.txt" ;;
        stage) stage "$engine" ;;
        model) core_env && bounded "$seconds" python3 scripts/gpu/make_random_qwen.py "$MODEL15" ;;
        conformance) engine_env "$engine" && conformance "$engine" "$seconds" ;;
        server-conformance) engine_env "$engine" && server_conformance "$engine" "$seconds" ;;
        generate) engine_env "$engine" && generate "$engine" "$seconds" ;;
        diagnose) engine_env "$engine" && diagnose "$engine" "$seconds" ;;
        consistency) engine_env "$engine" && consistency "$engine" "$seconds" ;;
        weight-sync) engine_env "$engine" && bounded "$seconds" python3 scripts/gpu/with_engine_defaults.py \
            core/benchmarks/bench_weight_sync.py --mode gpu --shape qwen2.5-1.5b --engine "$engine" \
            ${WEIGHT_SYNC_ARGS:-} --json "$OUT/$engine-weight-sync-$(date -u +%H%M%S).json" ;;
        wake-cycle) engine_env "$engine" && bounded "$seconds" python3 scripts/gpu/with_engine_defaults.py \
            core/benchmarks/bench_wake_cycle.py --engine "$engine" --shape qwen2.5-1.5b ${WAKE_CYCLE_ARGS:-} \
            --json "$OUT/$engine-wake-cycle-$(date -u +%H%M%S).json" ;;
        colocated) core_env && bounded "$seconds" python3 core/benchmarks/bench_weight_sync.py --mode gpu \
            --shape qwen2.5-1.5b --skip broadcast,streamed,per_tensor,raw ${WEIGHT_SYNC_ARGS:-} \
            --json "$OUT/colocated-$(date -u +%H%M%S).json" ;;
        apply-copy) core_env && bounded "$seconds" python3 core/benchmarks/bench_apply_copy.py --shape qwen2.5-1.5b \
            ${APPLY_COPY_ARGS:-} --json "$OUT/apply-copy-$(date -u +%H%M%S).json" ;;
        weight-sync-tests) { if [ -n "$engine" ]; then engine_env "$engine"; else core_env; fi; } \
            && bounded "$seconds" python3 scripts/gpu/with_engine_defaults.py \
            -m pytest -p no:cacheprovider -q -s -rA tests/weight_sync/test_gpu.py ${PYTEST_ARGS:-} ;;
        trainer-side) engine_env "$engine" && bounded "$seconds" python3 core/benchmarks/bench_trainer_side.py \
            --part sharded --device cuda --shape qwen2.5-1.5b --bucket-bytes $((1 << 30)) \
            --json "$OUT/trainer-side.json" ;;
        broadcast) core_env && bounded "$seconds" python3 core/benchmarks/bench_weight_sync.py --mode gpu \
            --shape qwen2.5-1.5b --skip colocated ${BROADCAST_ARGS:-} --json "$OUT/broadcast.json" ;;
        async-rl) engine_env "$engine" && PYTHONPATH=$PYTHONPATH:$REPO/examples/rl_demo/src bounded "$seconds" \
            python3 scripts/gpu/with_engine_defaults.py examples/rl_demo/benchmarks/bench_async.py \
            --backend "$engine" --model $TINY --trainer-device cuda --steps 40 --repeats 2 \
            --engine-option gpu_memory_utilization=0.3 ${ASYNC_RL_ARGS:-} --json "$OUT/$engine-async-rl.json" ;;
        pause) engine_env "$engine" && pause_bench "$engine" "$seconds" ;;
        rl-model) core_env && bounded "$seconds" python3 scripts/gpu/make_random_qwen.py "$RL_MODEL" --tokenizer-vocab ;;
        rl-step) engine_env "$engine" && PYTHONPATH=$PYTHONPATH:$REPO/examples/rl_demo/src bounded "$seconds" \
            python3 scripts/gpu/with_engine_defaults.py examples/rl_demo/benchmarks/bench_step.py \
            --backend "$engine" --model "$RL_MODEL" --trainer-device cuda --engine-option gpu_memory_utilization=0.3 \
            ${RL_STEP_ARGS-$RL_STEP_LEARNING} --json "$OUT/$engine-rl-step-$(date -u +%H%M%S).json" ;;
        bundle) bundle_results ;;
        *) log "unknown step $name"; return 2 ;;
    esac
}

bundle_results() {  # $OUT's results but logs and bundles -> one $OUT/results-HHMMSS.tgz
    local files archive
    mapfile -t files < <(cd "$OUT" && find . -mindepth 1 -maxdepth 3 -type f ! -name '*.log' ! -name log \
        ! -name 'results-*.tgz' -printf '%P\n' | sort)
    if [ ${#files[@]} -eq 0 ]; then log "bundle: no results to bundle"; return 0; fi
    archive="results-$(date -u +%H%M%S).tgz"
    [ -e "$OUT/$archive" ] && archive="results-$(date -u +%H%M%S)-${#files[@]}-$RANDOM.tgz"  # one a second
    tar -czf "$OUT/$archive" -C "$OUT" "${files[@]}" && (cd "$OUT" && rm -f "${files[@]}") || return 1
    log "bundled ${#files[@]} result(s) into $archive: ${files[*]}"
}

main() {
    local status=0 step start rc
    for step in "$@"; do
        start=$SECONDS
        run_step "$step"; rc=$?
        log "step $step exit $rc after $(( SECONDS - start ))s"
        [ $rc -ne 0 ] && status=$rc
    done
    return $status
}

main "$@" 2>&1 | tee -a "$OUT/log"
exit "${PIPESTATUS[0]}"
