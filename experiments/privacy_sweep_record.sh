#!/usr/bin/env bash
# Record-level DP-SGD in the papers' regime: few clients with >= 1,000 examples each. FedIT,
# FFA-LoRA, Fed-SB and FedSVD at epsilon 1, 3, 8, 32 and without DP, on the language-ID task
# (9 languages, 4 497 sentences from the chatterbot-corpus wheel: experiments/data/
# make_language_id.py; 3 617 for training), split IID over 3 clients (~1 200 each), all 3 in
# each of 6 rounds of 10 local steps. Writes experiments/results/privacy-record/: sweep.csv,
# sweep.md, privacy_utility.png, runs/<name>/, logs/<name>.log, runs.csv and rounds.csv
# (fedlora.report.archive: every run's numbers, which git keeps instead of the run folders).
# Resumable: finished runs are skipped.
#
#   bash experiments/privacy_sweep_record.sh [SEEDS] [EXTRA KEY=VALUE ...]   # default seeds 0,1
#
# The DP-SGD setting (docs/results/privacy-record.md): plain SGD at batch 64
# with dp.clip=1; the adapters' lr and the classifier head's head_lr are chosen per epsilon by
# experiments/privacy_tune_record.sh (FedIT, seed 0) and tied to it here
# (dp.epsilon:lr:head_lr=...; the grid picked lr 0.1, head_lr 10 at every epsilon). Seeds vary
# slowest, then epsilon (32 last), then the method. Environment knobs, used by the tuning
# script and to rerun the first AdamW pass (docs/results/privacy-record-adamw.md):
#   STRATEGIES  methods (default fedavg,ffa,fedsb,fedsvd)
#   AXIS        the epsilon axis (default: the tuned dp.epsilon:lr:head_lr triples below)
#   SETTING     the optimiser keys (default: the SGD setting above)
#   OUT         the sweep's directory
# With SEEDS given as '' there is no seed axis, and AXIS may tie the seed too
# (seed:dp.epsilon:...=0:8:...,1:8:...): how the committed runs were ordered
# (docs/results/privacy-record.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1-0,1}
shift || true
TUNED="dp.epsilon:lr:head_lr=1:0.1:10,3:0.1:10,8:0.1:10,inf:0.1:10,32:0.1:10"
DATA=experiments/data/language_id.jsonl
OUT=${OUT:-experiments/results/privacy-record}
[ -f "$DATA" ] || python experiments/data/make_language_id.py "$DATA"
# shellcheck disable=SC2086  # AXIS and SETTING are lists of key=value words
python -m fedlora.sweep ${SEEDS:+seed=$SEEDS} ${AXIS:-$TUNED} strategy="${STRATEGIES:-fedavg,ffa,fedsb,fedsvd}" \
    data.path="$DATA" data.text_field=sentence data.label_field=language \
    clients=3 clients_per_round=3 rounds=6 local_steps=10 eval_every=3 \
    ${SETTING:-optimizer=sgd batch_size=64 dp.clip=1} \
    out="$OUT" "$@"
python -m fedlora.report.archive "$OUT" --out "$OUT"
