#!/usr/bin/env bash
# Client-level DP (dp.mode=client) on the default task: 100 clients, Poisson-sampled at
# q = 10/100 per round, FedSVD, FedIT, Fed-SB and FFA-LoRA at epsilon 1, 3, 8 and without DP.
# Writes experiments/results/privacy-client/ (sweep.csv, sweep.md, privacy_utility.png, runs/,
# logs/). Resumable.
#
#   bash experiments/privacy_sweep_client.sh [SEEDS] [EXTRA KEY=VALUE ...]   # default seeds 0,1
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1}
shift || true
python -m fedlora.sweep strategy=fedsvd,fedavg,fedsb,ffa dp.epsilon=1,3,8,inf seed="$SEEDS" \
    dp.mode=client weighting=uniform clients=100 out=experiments/results/privacy-client "$@"
