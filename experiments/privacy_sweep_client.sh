#!/usr/bin/env bash
# Client-level DP (dp.mode=client) on the default task: 100 clients, Poisson-sampled at
# q = 10/100 per round, 25 rounds, dp.clip=1 with fixed clipping, uniform weighting, at epsilon
# 1, 3, 8 and without DP. Writes experiments/results/privacy-client/ (sweep.csv, sweep.md,
# privacy_utility.png, runs/, logs/, runs.csv and rounds.csv: every run's numbers, which git
# keeps instead of the run folders and logs). Resumable: finished runs are skipped.
#
#   bash experiments/privacy_sweep_client.sh [SEEDS] [EXTRA KEY=VALUE ...]   # default seeds 0,1
#
# STRATEGIES (environment) sets the methods; the committed runs are FedSVD's (the default: a run
# takes 7-8 minutes alone on 2 cores, 16-18 beside another job). More than one method makes the
# method part of each run's name (fedavg_epsilon1_seed0 instead of epsilon1_seed0). EPSILONS
# (default 1,3,8,inf) and OUT (default experiments/results/privacy-client) select a part of the
# sweep and where it goes, e.g. the other methods at epsilon 8 (not run yet):
#   STRATEGIES=fedavg,fedsb,ffa EPSILONS=8 OUT=experiments/results/privacy-client-methods \
#       bash experiments/privacy_sweep_client.sh 0
# (a single value is a fixed setting, not an axis: those runs would be named by method only).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1}
shift || true
OUT=${OUT:-experiments/results/privacy-client}
python -m fedlora.sweep strategy="${STRATEGIES:-fedsvd}" dp.epsilon="${EPSILONS:-1,3,8,inf}" \
    seed="$SEEDS" dp.mode=client weighting=uniform clients=100 out="$OUT" "$@"
python -m fedlora.report.archive "$OUT" --out "$OUT"
