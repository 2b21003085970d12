#!/usr/bin/env bash
# The committed comparison: FedIT, FFA-LoRA, Fed-SB, FedSVD, LoRA-FAIR, FedEx-LoRA and RoLoRA, 3 seeds
# each, on a Dirichlet(0.1) label split with FedAU's Bernoulli participation, then one table and two
# plots. Writes experiments/results/methods/<strategy>-seed<seed>/ (one run each),
# comparison.md/.csv, accuracy_vs_round.png, accuracy_vs_bytes.png, runs.csv and rounds.csv
# (fedlora.report.archive: every run's numbers, which git keeps instead of the run folders).
#
# Reduced setting (the default 100 clients x 25 rounds costs ~9 min per run on 2 cores; 18 runs
# would take ~3 h): 20 clients, each present in a round with probability p_k (mean 0.3, so ~6 per
# round), 8 rounds of 6 local steps. 80-130 s per run on 2 quiet cores (~30 min in all); it took
# 61 min on 2026-11-24 with four other jobs sharing the cores.
# Seeds vary slowest, so an interrupted job still has every method at seed 0.
#
#   bash experiments/compare_methods.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/methods
SETTING=(clients=20 partition=dirichlet partition.alpha=0.1 participation=bernoulli
         participation.mean_p=0.3 rounds=8 local_steps=6)

python -m fedlora.simulate -m seed=0,1,2 strategy=fedavg,ffa,fedsb,fedsvd,lorafair,fedex,rolora \
    "${SETTING[@]}" "hydra.sweep.dir=$OUT" 'hydra.sweep.subdir=${strategy}-seed${seed}'
python -m fedlora.report.compare "$OUT" --out "$OUT"
python -m fedlora.report.archive "$OUT" --out "$OUT"
