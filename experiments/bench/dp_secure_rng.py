"""What Opacus' secure_mode costs: DP-SGD step time with secure_mode on vs off.

    python experiments/bench/dp_secure_rng.py [--strategy fedavg] [--steps 30]
        [--batch-size 16] [--max-length 32] [--threads 1]

The same fixed-size batches of the default task (all-MiniLM-L6-v2 with fedlora's LoRALinear
adapters, the strategy's trained parts, batch 16) go through one Opacus DP-SGD step each
(per-example gradients, clipping, noise from a node-secret generator, AdamW), built with
``fedlora.privacy.randomness.make_dp_optimizer``; once with ``secure_mode=False`` and once with
``True`` (Opacus draws 1 + 4 Gaussians per coordinate instead of 1), each twice, alternating,
and the faster of the two kept. Also the noise draw alone (Opacus' ``_generate_noise`` for the
trained tensors, fastest of 20), which a busy machine disturbs less than a whole step. Prints
one JSON line with seconds per step and per noise draw, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch


def step_seconds(strategy: str, steps: int, batch_size: int, max_length: int) -> dict:
    from opacus import GradSampleModule

    from default_batches import default_model_and_batches
    from fedlora.privacy.randomness import NodeSecret, make_dp_optimizer, secret_torch_generator

    cfg, bundle, batches, trained = default_model_and_batches(strategy, steps, batch_size,
                                                              max_length)
    secret = NodeSecret.generate()

    def run(secure_mode: bool, counter: int) -> float:
        bundle.load(bundle.initial_state)
        trainable = bundle.set_trainable(trained)
        bundle.model.train()
        wrapped = GradSampleModule(bundle.model, batch_first=True, loss_reduction="mean")
        optimizer = make_dp_optimizer(torch.optim.AdamW(trainable, lr=cfg.lr), 1.0, 1.0,
                                      batch_size, secret_torch_generator(secret, "noise", counter),
                                      secure_mode)
        begin = time.perf_counter()
        for batch in batches:
            wrapped(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - begin) / steps
        wrapped._close()
        return seconds

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        run(False, 0)  # warm-up
        timings = {"plain": [], "secure": []}
        for counter in range(1, 5):
            secure = counter % 2 == 0
            timings["secure" if secure else "plain"].append(run(secure, counter))
    plain, secure = min(timings["plain"]), min(timings["secure"])
    params = bundle.set_trainable(trained)
    noise_s = {mode: noise_seconds(params, mode) for mode in (False, True)}
    return {"strategy": strategy, "trained_parameters": sum(p.numel() for p in params),
            "dp_step_s": round(plain, 4), "dp_secure_step_s": round(secure, 4),
            "ratio": round(secure / plain, 3), "noise_s": round(noise_s[False], 6),
            "noise_secure_s": round(noise_s[True], 6),
            "noise_ratio": round(noise_s[True] / noise_s[False], 3)}


def noise_seconds(params, secure_mode: bool, repeats: int = 20) -> float:
    """Seconds for one noise draw over ``params`` by Opacus, the fastest of ``repeats``."""
    from opacus.optimizers.optimizer import _generate_noise

    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        for param in params:
            _generate_noise(1.0, param, generator=generator, secure_mode=secure_mode)
        best = min(best, time.perf_counter() - begin)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)"
    result = step_seconds(args.strategy, args.steps, args.batch_size, args.max_length)
    print(json.dumps({"machine": machine, "batch_size": args.batch_size,
                      "max_length": args.max_length, "steps": args.steps, **result}))


if __name__ == "__main__":
    main()
