#!/usr/bin/env bash
# The tuning grid of the record-level DP sweep, in experiments/privacy_sweep_record.sh's setting
# (language ID, 3 clients of ~1 200 examples, all 3 in each of 6 rounds of 10 DP-SGD steps at
# batch 32), seed 0: client lr x dp.clip at one epsilon, every setting recorded as its own run,
# as a DP paper reports its tuning runs (they spend privacy too: a released tuned result is only
# as private as the grid's composition). Writes experiments/results/privacy-record-tuning/
# (sweep.md/.csv, runs/<name>/). Resumable: finished runs are skipped.
#
#   bash experiments/privacy_tune_record.sh [EPSILON] [STRATEGIES] [KEY=VALUE ...]
#   bash experiments/privacy_tune_record.sh 8 fedsb,fedavg            # what was run
set -euo pipefail
cd "$(dirname "$0")/.."
EPSILONS=${1:-8} STRATEGIES=${2:-fedsb,fedavg} OUT=experiments/results/privacy-record-tuning \
    exec bash experiments/privacy_sweep_record.sh 0 lr=1e-3,3e-3 dp.clip=0.1,1 \
    "${@:3}"
