#!/usr/bin/env bash
# The tuning grid of the record-level DP sweep (experiments/privacy_sweep_record.sh's setting:
# language ID, 3 clients of ~1 200 examples, 6 rounds of 10 plain-SGD steps at batch 64,
# dp.clip=1): the adapters' lr in {0.01, 0.1} x the classifier head's lr in {10, 30} at epsilon
# 1 and 3; at epsilon 8 lr 0.1 only (0.01 was no better at either); then head_lr 5 with lr 0.1
# at epsilon 1, 3 and 8, because 10 won at the grid's lower edge. Epsilon 32 and no DP take
# epsilon 8's choice, untuned. FedIT, seed 0. Every setting is recorded as its own run, as a DP
# paper reports its tuning runs (they spend privacy too: a released tuned result is only as
# private as the grid's composition). The sweep then ties the best (lr, head_lr) to each
# epsilon (TUNED there). Writes experiments/results/
# privacy-record-tuning/ (sweep.md/.csv, runs/<name>/, runs.csv, rounds.csv). Resumable.
#
#   bash experiments/privacy_tune_record.sh [KEY=VALUE ...]
#
# The first, AdamW pass (docs/results/privacy-record-adamw.md) is the same setting with the
# methods' defaults:
#   SETTING="batch_size=32 dp.clip=1" AXIS="dp.epsilon=1,3,8,32,inf" \
#       OUT=experiments/results/privacy-record-adamw bash experiments/privacy_sweep_record.sh 0
set -euo pipefail
cd "$(dirname "$0")/.."
GRID=1:0.01:10,1:0.01:30,1:0.1:10,1:0.1:30,3:0.01:10,3:0.01:30,3:0.1:10,3:0.1:30,8:0.1:10,8:0.1:30
GRID=$GRID,1:0.1:5,3:0.1:5,8:0.1:5
STRATEGIES=fedavg AXIS="dp.epsilon:lr:head_lr=$GRID" \
    SETTING="optimizer=sgd batch_size=64 dp.clip=1" OUT=experiments/results/privacy-record-tuning \
    exec bash experiments/privacy_sweep_record.sh 0 "$@"
