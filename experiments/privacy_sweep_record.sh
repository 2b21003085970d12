#!/usr/bin/env bash
# Record-level DP-SGD in the papers' regime: few clients with >= 1,000 examples each. FedIT,
# FFA-LoRA, Fed-SB and FedSVD at epsilon 1, 3, 8, 32 and without DP, on the language-ID task
# (9 languages, 4 497 sentences from the chatterbot-corpus wheel: experiments/data/
# make_language_id.py; ~3 600 for training), split IID over 3 clients (~1 200 each), all 3 in
# every round. Writes experiments/results/privacy-record/: sweep.csv, sweep.md,
# privacy_utility.png, runs/<name>/ and logs/<name>.log. Resumable: finished runs are skipped.
#
#   bash experiments/privacy_sweep_record.sh [SEEDS] [EXTRA KEY=VALUE ...]   # default seeds 0,1
#
# STRATEGIES, EPSILONS and OUT (environment) replace the method and epsilon axes and the
# directory; experiments/privacy_tune_record.sh uses them for its lr x clip grid. The first pass
# uses every method's default lr and dp.clip=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1}
shift || true
DATA=experiments/data/language_id.jsonl
[ -f "$DATA" ] || python experiments/data/make_language_id.py "$DATA"
python -m fedlora.sweep strategy="${STRATEGIES:-fedavg,ffa,fedsb,fedsvd}" \
    dp.epsilon="${EPSILONS:-1,3,8,32,inf}" seed="$SEEDS" \
    data.path="$DATA" data.text_field=sentence data.label_field=language \
    clients=3 clients_per_round=3 rounds=6 local_steps=10 batch_size=32 eval_every=3 \
    out="${OUT:-experiments/results/privacy-record}" "$@"
