#!/usr/bin/env bash
# precision=fp32 against precision=auto (bf16 autocast where the CPU has AMX or AVX-512 BF16), seeds
# 0 and 1, on the default job and on the generative default; one run at a time, fp32 and auto
# alternating (seed varies slowest), so that a shared machine's load falls on both alike. Then one
# table per task (mean ± sd over the seeds, wall time included).
# Writes experiments/results/precision/{default,generation}/<precision>-seed<seed>/ and
# comparison.md/.csv in each. summary.json's `precision` says what `auto` chose on the machine.
#
#   bash experiments/precision.sh [default|generation|both] [KEY=VALUE ...]   # from the repo root
#   bash experiments/precision.sh generation rounds=5 eval_every=5   # a reduced generative run
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-both}
shift || true
OUT=experiments/results/precision
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

if [ "$WHICH" != generation ]; then
  python -m fedlora.simulate -m seed=0,1 precision=fp32,auto strategy=fedsb clients=100 "$@" \
      "hydra.sweep.dir=$OUT/default" 'hydra.sweep.subdir=${precision}-seed${seed}'
  python -m fedlora.report.compare "$OUT/default" --out "$OUT/default" --label-by precision
fi
if [ "$WHICH" != default ]; then
  python -m fedlora.simulate -m seed=0,1 precision=fp32,auto task=arithmetic strategy=fedsb \
      clients=20 "$@" \
      "hydra.sweep.dir=$OUT/generation" 'hydra.sweep.subdir=${precision}-seed${seed}'
  python -m fedlora.report.compare "$OUT/generation" --out "$OUT/generation" --label-by precision
fi
