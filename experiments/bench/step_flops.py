"""The floating-point operations of one client step on the default task, counted by PyTorch.

    python experiments/bench/step_flops.py [--strategy fedsb] [--steps 5]

Forward and backward of the strategy's default adapters on the default model (all-MiniLM-L6-v2,
batch 16, max_length 32, the same seeded batches as step_time.py), only the parts the strategy
trains (Fed-SB: R and the head) trainable, counted with ``torch.utils.flop_counter.FlopCounterMode`` and averaged over
``--steps`` batches. Divided by a measured step time it gives the rate a step runs at
(RESULTS.md, "The floor").
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from step_time import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedsb")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    _, bundle, batches, trained = setup("topic", args.strategy, args.steps)
    model = bundle.model
    bundle.set_trainable(trained)  # what a client of this strategy trains, as step_time.py
    total, tokens = 0, 0
    for batch in batches:
        counter = FlopCounterMode(display=False)
        with counter:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits.float().sum().backward()
        total += counter.get_total_flops()
        tokens += batch["input_ids"].numel()
    print(f"{args.strategy}: {total / len(batches) / 1e9:.1f} GFLOP per step (forward and "
          f"backward), {tokens / len(batches):.0f} padded tokens per step, {len(batches)} steps")


if __name__ == "__main__":
    main()
