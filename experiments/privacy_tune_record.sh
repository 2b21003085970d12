#!/usr/bin/env bash
# The tuning grid of the record-level DP sweep (experiments/privacy_sweep_record.sh's setting:
# language ID, 3 clients of ~1 200 examples, all 3 in each of 6 rounds of 10 DP-SGD steps at
# batch 32): client lr x dp.clip at one epsilon, every setting recorded as its own run, as a DP
# paper reports its tuning runs (they spend privacy too: a released tuned result is only as
# private as the grid's composition). Writes experiments/results/privacy-record-tuning/
# (sweep.md/.csv, runs/<name>/). Resumable: finished runs are skipped.
#
#   bash experiments/privacy_tune_record.sh [EPSILON] [STRATEGIES] [KEY=VALUE ...]
#   bash experiments/privacy_tune_record.sh 8 fedsb,fedavg            # what was run (seed 0)
set -euo pipefail
cd "$(dirname "$0")/.."
EPSILON=${1:-8}
STRATEGIES=${2:-fedsb,fedavg}
shift $(( $# < 2 ? $# : 2 ))
DATA=experiments/data/language_id.jsonl
[ -f "$DATA" ] || python experiments/data/make_language_id.py "$DATA"
python -m fedlora.sweep strategy="$STRATEGIES" dp.epsilon="$EPSILON" lr=1e-3,3e-3 dp.clip=0.1,1 \
    seed=0 data.path="$DATA" data.text_field=sentence data.label_field=language \
    clients=3 clients_per_round=3 rounds=6 local_steps=10 batch_size=32 eval_every=3 \
    out=experiments/results/privacy-record-tuning "$@"
