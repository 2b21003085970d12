"""DP-SGD's cost on a client: local step time with and without Opacus, on the default model.

    python experiments/bench/dp_step_time.py [--strategies fedsb,fedavg] [--steps 40]
        [--batch-size 16] [--max-length 32] [--threads 1]

Both sides run ``fedlora.clients.train.client_update`` on the same fixed-size batches of the
default task (all-MiniLM-L6-v2, the strategy's default rank and trained parts, batch 16): once
plain, once wrapped by Opacus (per-example gradients, clipping, noise; the wrapping and
unwrapping a client does per message included). Prints one JSON line per strategy with the
seconds per local step and their ratio. Target (issue 5): DP/non-DP <= 2x on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def step_seconds(strategy: str, steps: int, batch_size: int, max_length: int) -> dict:
    from default_batches import default_model_and_batches
    from fedlora.clients.dp import ClientPrivacy
    from fedlora.clients.train import client_update

    cfg, bundle, batches, trained = default_model_and_batches(strategy, steps, batch_size,
                                                              max_length)
    privacy = ClientPrivacy(target_epsilon=8.0, delta=1e-5, clip=1.0, accountant="rdp",
                            noise_multiplier=1.0, sample_rate=batch_size / 15, batch_size=batch_size,
                            noise_generator=torch.Generator().manual_seed(0))
    timings = {}
    for label, setting in (("warm-up", None), ("plain", None), ("dp", privacy), ("plain2", None),
                           ("dp2", privacy)):
        bundle.load(bundle.initial_state)
        trainable = bundle.set_trainable(trained)
        begin = time.perf_counter()
        client_update(bundle.model, trainable, batches, cfg.lr, privacy=setting)
        timings[label] = (time.perf_counter() - begin) / steps
    plain = min(timings["plain"], timings["plain2"])  # the less disturbed of two runs each
    dp = min(timings["dp"], timings["dp2"])
    return {"strategy": strategy, "rank": cfg.rank, "trained_parts": list(trained),
            "plain_step_s": round(plain, 4), "dp_step_s": round(dp, 4),
            "ratio": round(dp / plain, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="fedsb,fedavg")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)"
    for strategy in args.strategies.split(","):
        result = step_seconds(strategy, args.steps, args.batch_size, args.max_length)
        print(json.dumps({"machine": machine, "batch_size": args.batch_size,
                          "max_length": args.max_length, "steps": args.steps, **result}))


if __name__ == "__main__":
    main()
