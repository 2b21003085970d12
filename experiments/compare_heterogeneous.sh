#!/usr/bin/env bash
# Clients of different capacity: every method with a rule for clients of different ranks
# (docs/algorithms.md), with client_ranks=[2,4,8,16] (partition p at rank [2,4,8,16][p % 4]),
# and each method at the homogeneous ranks 16 and 2 as bounds, on the default task (topic
# classification, 100 clients, 10 a round, 25 rounds) and on the generative default
# (task=arithmetic at compare_generation.sh's budget: 20 clients, 5 rounds, evaluated at rounds
# 0 and 5, the stacks and residuals factored); seeds 0 and 1. Every client uses the scale
# s = alpha / rank of the largest rank (alpha = 2 x 16 = 32 for client_ranks and rank 16,
# 2 x 2 for rank 2: s = 2 in every run).
#
# Writes the runs to experiments/results/heterogeneous/runs/<setting>/<strategy>-seed<seed>/
# (<setting>: default-ranks, default-r16, default-r2, arithmetic-ranks, ...; not kept by git),
# then runs.csv and rounds.csv (fedlora.report.archive: every number, which git keeps),
# comparison.csv/.md and the plots (experiments/heterogeneous_table.py). docs/results/
# heterogeneous.md is generated from them (python experiments/make_pages.py). A finished run
# (its summary.json) is not run again, and a run that was stopped (a kill, a lost Ray
# worker) continues from its checkpoint (resume=), bit for bit: rerun the same command.
#
# A default-task run takes ~5-10 min on 2 cores (the four tier evaluations add to each round's
# one), an arithmetic one ~15 min: the whole grid (9 methods x 3 settings x 2 tasks x 2 seeds)
# is ~20 h. Run it in parts:
#
#   bash experiments/compare_heterogeneous.sh PART [SEEDS] [METHODS]   # from the repository root
#     PART: default | default-bounds | arithmetic | arithmetic-bounds | table | all
#     SEEDS: 0,1 (default); METHODS: comma-separated (default: every method with a rule)
#   bash experiments/compare_heterogeneous.sh default 0,1 flora,flexlora,hetlora,fedavg
#   bash experiments/compare_heterogeneous.sh table     # archive what ran, table, plots
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
SEEDS=${2:-0,1}
SUPPORTED=$(python -c "from fedlora.strategies import STRATEGIES
print(','.join(name for name, cls in STRATEGIES.items() if cls.rank_rule is not None))")
METHODS=${3:-$SUPPORTED}
OUT=experiments/results/heterogeneous
RANKS='client_ranks=[2,4,8,16]'
ARITHMETIC=(task=arithmetic clients=20 rounds=5 eval_every=5 fedex.residual=factored
            flora.stack=factored)

run_one() {  # run_one DIR KEY=VALUE...: one run; a stopped one continues from its checkpoint
    local dir=$1 attempt
    shift
    [[ -f $dir/summary.json ]] && return 0
    for attempt in 1 2 3 4 5; do
        if [[ -f $dir/checkpoint.pt ]]; then
            python -m fedlora.simulate "resume=$dir" && return 0
        else
            python -m fedlora.simulate "$@" "out=$dir" && return 0
        fi
        echo "$dir stopped (attempt $attempt): continuing from its checkpoint" >&2
    done
    return 1
}

sweep() {  # sweep SETTING KEY=VALUE...: every seed x method into runs/SETTING/
    local setting=$1 seed strategy
    shift
    for seed in ${SEEDS//,/ }; do
        for strategy in ${METHODS//,/ }; do
            run_one "$OUT/runs/$setting/$strategy-seed$seed" "strategy=$strategy" "seed=$seed" "$@"
        done
    done
}

want() { [[ $PART == "$1" || $PART == all ]]; }
if want default; then sweep default-ranks "$RANKS"; fi
if want default-bounds; then sweep default-r16 rank=16; sweep default-r2 rank=2; fi
if want arithmetic; then sweep arithmetic-ranks "$RANKS" "${ARITHMETIC[@]}"; fi
if want arithmetic-bounds; then
    sweep arithmetic-r16 rank=16 "${ARITHMETIC[@]}"
    sweep arithmetic-r2 rank=2 "${ARITHMETIC[@]}"
fi
python -m fedlora.report.archive "$OUT"/runs/* --out "$OUT"
python experiments/heterogeneous_table.py "$OUT"
