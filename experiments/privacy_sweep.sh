#!/usr/bin/env bash
# Issue 5's committed privacy-budget sweep: FedIT, FFA-LoRA, Fed-SB and FedSVD under record-level
# DP-SGD at epsilon 1, 3, 8, 64, 256, 1024 and without DP, 2 seeds each (56 runs), on the default
# task with a Dirichlet(0.5) label split. Writes experiments/results/privacy/: sweep.csv, sweep.md,
# privacy_utility.png, accuracy_vs_bytes.png, runs/<name>/, logs/<name>.log, runs.csv and
# rounds.csv (fedlora.report.archive: every run's numbers, which git keeps instead of the run
# folders and logs).
#
# Reduced setting so that 56 runs fit on 2 CPU cores (~80 s each, ~75 min in all): 10 clients,
# 2 per round, 10 rounds of 8 local steps at batch 32, evaluated every 5 rounds. epsilon 64-1024
# are not privacy anyone should deploy; they are there to show where utility comes back.
# Resumable: run it again and finished runs are skipped.
#
#   bash experiments/privacy_sweep.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
python -m fedlora.sweep strategy=fedavg,ffa,fedsb,fedsvd dp.epsilon=1,3,8,64,256,1024,inf seed=0,1 \
    clients=10 clients_per_round=2 rounds=10 local_steps=8 batch_size=32 partition=dirichlet \
    eval_every=5 out=experiments/results/privacy
python -m fedlora.report.archive experiments/results/privacy --out experiments/results/privacy
