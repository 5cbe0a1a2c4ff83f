#!/usr/bin/env bash
# Runs every target of `make test`, one at a time and in make's order, and prints how long each took:
# the way to find what to trim when a fresh clone's `make test` nears CI's time budget.
# Each pytest run also lists its slowest tests (--durations=20, unless PYTEST_ADDOPTS says otherwise);
# TARGETS="a b" times only those targets.
# Usage: scripts/ci/time_targets.sh [report.tsv]   (run it in a fresh clone to count environment builds;
# each target's output goes to target-logs/ beside the report)
set -uo pipefail
cd "$(dirname "$0")/../.."
report=${1:-.cache/target-times.tsv}
logs=$(dirname "$report")/target-logs
mkdir -p "$logs"
targets=${TARGETS:-$(make -s print-test-targets)}
export PYTEST_ADDOPTS=${PYTEST_ADDOPTS:---durations=20}
printf 'target\tseconds\texit\tload1\n' > "$report"
start_all=$(date +%s)
for target in $targets; do
    start=$(date +%s)
    make "$target" > "$logs/$target.log" 2>&1
    rc=$?
    printf '%s\t%d\t%d\t%s\n' "$target" $(( $(date +%s) - start )) "$rc" "$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$report"
done
printf 'total\t%d\t-\t-\n' $(( $(date +%s) - start_all )) | tee -a "$report"
