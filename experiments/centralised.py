"""Centralised LoRA fine-tuning of the same model on the same split: the reference accuracy.

    python experiments/centralised.py [--epochs 15] [--rank 8] [--lr 3e-3] [--batch-size 32]
        [--threads N]

Trains LoRA (A, B on peft's default targets, scale 2) and the head on the whole training split
(max_length 32, as the federated default) with AdamW, evaluates on the test split after every epoch, and prints one JSON line per epoch plus
the best accuracy. Federated runs are judged against this number (README).
"""

import argparse
import json
import random
import time

import torch

from fedlora.data import DataSpec
from fedlora.tasks.classification import Batches, evaluate, load_dataset
from fedlora.models import ModelSpec, build_model
from fedlora.clients.train import client_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset(DataSpec())
    bundle = build_model(ModelSpec(num_labels=data.num_labels, rank=args.rank,
                                   alpha=2.0 * args.rank, init_seed=args.seed))
    train = Batches(bundle.tokenizer, data.train.texts, data.train.labels, 32)
    test = Batches(bundle.tokenizer, data.test.texts, data.test.labels, 32)
    majority = max(data.test.labels.count(c) for c in set(data.test.labels)) / len(data.test)
    print(json.dumps({"train": len(train), "test": len(test), "labels": data.num_labels,
                      "majority_class_accuracy": round(majority, 4)}))
    trainable = bundle.set_trainable(("A", "B", "head"))
    rng, started, best = random.Random(args.seed), time.time(), 0.0
    for epoch in range(1, args.epochs + 1):
        stats = client_update(bundle.model, trainable,
                              train.epoch(range(len(train)), args.batch_size, rng), args.lr)
        metrics = evaluate(bundle, test)
        best = max(best, metrics["accuracy"])
        print(json.dumps({"epoch": epoch, "train_loss": round(stats["train_loss"], 4),
                          "accuracy": round(metrics["accuracy"], 4), "loss": round(metrics["loss"], 4),
                          "wall_s": round(time.time() - started, 1)}), flush=True)
    print(json.dumps({"best_accuracy": round(best, 4), "final_accuracy": round(metrics["accuracy"], 4)}))


if __name__ == "__main__":
    main()
