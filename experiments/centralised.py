"""Centralised LoRA fine-tuning of the same model on the same split: the reference score.

    python experiments/centralised.py [--task topic] [--epochs 15] [--steps N]
        [--eval-every-steps N] [--rank 8] [--lr 3e-3] [--batch-size 32] [--threads N]

Trains LoRA (A and B on peft's default targets, scale 2; and the head of a classifier) on the
whole training split of ``--task`` with AdamW, through the same task interface, model builder
and client loop as a federated run (max_length: the task's default), and prints one JSON line
per evaluation plus the best and final scores. Classification evaluates after every epoch
(``--epochs``); ``--steps`` trains that many batches instead (drawn in reshuffled passes) and
evaluates every ``--eval-every-steps`` (a generative task's epoch of 2 000 examples is too long
for a CPU). Federated runs are judged against this number (docs/results/default.md).

    python experiments/centralised.py                       # topic classification
    python experiments/centralised.py --task arithmetic --steps 160 --eval-every-steps 80 \\
        --batch-size 8 --lr 3e-3                            # SmolLM2, exact match on 50 problems
"""

import argparse
import json
import random
import time

import torch

from fedlora.clients.train import client_update
from fedlora.config import RunConfig
from fedlora.model.pretrained import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="topic")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every-steps", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = RunConfig.from_dict({"task": args.task, "strategy": "fedavg", "rank": args.rank,
                               "alpha": 2.0 * args.rank, "seed": args.seed})
    task = cfg.task_spec()
    data = task.dataset()
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = task.training_examples(bundle.tokenizer, cfg.max_length)
    score = task.evaluator(bundle, data.test, cfg.max_length, "cpu")
    metric = task.primary_metric
    print(json.dumps({"task": cfg.task, "model": cfg.model, "train": len(train),
                      "test": len(data.test), "max_length": cfg.max_length}))
    trainable = bundle.set_trainable(("A", "B", "head"))
    rng, started = random.Random(args.seed), time.time()
    everything = range(len(train))

    def stages():
        """(unit, count so far, batches) for each stretch of training between evaluations."""
        if not args.steps:
            for epoch in range(1, args.epochs + 1):
                yield "epoch", epoch, train.epoch(everything, args.batch_size, rng)
            return
        chunk = args.eval_every_steps or args.steps
        for done in range(0, args.steps, chunk):
            count = min(chunk, args.steps - done)
            yield "step", done + count, train.sample_steps(everything, args.batch_size, count, rng)

    def report(unit: str, count: int, scored: dict, **extra) -> None:
        print(json.dumps({unit: count, **extra, **{k: round(v, 4) for k, v in scored.items()},
                          "wall_s": round(time.time() - started, 1)}), flush=True)

    scores = [score()]
    report("step", 0, scores[0])
    for unit, count, batches in stages():
        stats = client_update(bundle.model, trainable, batches, args.lr, loss=task.loss)
        scores.append(score())
        report(unit, count, scores[-1], train_loss=round(stats["train_loss"], 4))
    print(json.dumps({f"best_{metric}": round(max(s[metric] for s in scores), 4),
                      f"final_{metric}": round(scores[-1][metric], 4),
                      f"step0_{metric}": round(scores[0][metric], 4)}))


if __name__ == "__main__":
    main()
