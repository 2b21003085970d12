#!/usr/bin/env bash
# batching_runs.sh: the issue's end-to-end targets, back to back on one machine.
#
#   bash experiments/bench/batching_runs.sh [default|generative|both]
#
# Each pair runs today's engine (one client per node, precision=fp32, client_batch=1) and then
# the settings experiments/bench/RESULTS.md recommends for a CPU with AMX/AVX-512 BF16:
#   default:     python -m fedlora.simulate strategy=fedsb clients=100        (25 rounds)
#   generative:  python -m fedlora.simulate task=arithmetic strategy=fedsb clients=20  (10 rounds)
# and prints each run's wall time (the process's, start-up included), its final metric and the
# ratio. Targets: default <= 0.4x, generative <= 0.5x, accuracy within the seed spread.
# Environment: OUT (default /tmp/fedlora-batching-runs), BATCHED (the second run's extra keys;
# default "precision=auto client_batch=5": 2 hosts of 5 clients a round, one per core, for the
# default job, and "precision=auto" for the generative pair, whose 2 clients a round gain
# nothing from batching: RESULTS.md), EXTRA (keys for both runs of a pair, e.g. "rounds=5
# eval_every=5" for a reduced generative pair). A default-job run takes 4-5 min (fp32) on two
# quiet cores, 15-30 min on the shared VM.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/fedlora-batching-runs}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WHICH=${1:-both}

run() {  # name, keys...: one run, its wall time into $OUT/name.wall
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  local begin end
  begin=$(date +%s.%N)
  "$PY" -m fedlora.simulate "$@" "out=$OUT/$name" >"$OUT/$name.log" 2>&1
  end=$(date +%s.%N)
  echo "$end - $begin" | bc >"$OUT/$name.wall"
  echo "  $name: $(cat "$OUT/$name.wall") s"
}

report() {  # today batched
  "$PY" - "$OUT" "$1" "$2" <<'PYTHON'
import json, sys
from pathlib import Path

out, today, batched = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for name in (today, batched):
    summary = json.loads((out / name / "summary.json").read_text())
    metric = summary["primary_metric"]
    wall = float((out / f"{name}.wall").read_text())
    print(f"  {name:<22} wall {wall:8.1f} s  final {metric} {summary['final_' + metric]:.4f}  "
          f"best {summary.get('best_' + metric, float('nan')):.4f}")
ratio = float((out / f"{batched}.wall").read_text()) / float((out / f"{today}.wall").read_text())
print(f"  ratio batched / today: {ratio:.3f}")
PYTHON
}

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load now: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$WHICH" = default ] || [ "$WHICH" = both ]; then
  echo "default job (strategy=fedsb clients=100)"
  # shellcheck disable=SC2086
  run default-today strategy=fedsb clients=100 precision=fp32 client_batch=1 ${EXTRA:-}
  # shellcheck disable=SC2086
  run default-batched strategy=fedsb clients=100 ${BATCHED:-precision=auto client_batch=5} ${EXTRA:-}
  report default-today default-batched
fi
if [ "$WHICH" = generative ] || [ "$WHICH" = both ]; then
  echo "generative default (task=arithmetic strategy=fedsb clients=20)"
  # shellcheck disable=SC2086
  run generative-today task=arithmetic strategy=fedsb clients=20 precision=fp32 client_batch=1 ${EXTRA:-}
  # shellcheck disable=SC2086
  run generative-batched task=arithmetic strategy=fedsb clients=20 ${BATCHED:-precision=auto} ${EXTRA:-}
  report generative-today generative-batched
fi
