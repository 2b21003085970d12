"""fedlora's overhead over a bare PyTorch loop doing the same client work.

    python experiments/bench/client_overhead.py [--task topic] [--strategy fedavg]
        [--clients N] [--clients-per-round N] [--rounds 3] [--local-steps N] [--batch-size N]
        [--workers 2]

Sizes left out take the run's defaults (100 clients) and the task's run defaults (topic: 10
clients a round, 8 steps at batch 16; arithmetic: 2 a round, 8 steps at batch 8 on SmolLM2-135M).

Both sides train the same clients (the same partitions, sampled with the same seed), the same
local steps and batch size, from the same global state, and aggregate with the same maths:

* bare: one process, a plain loop over the clients, ``--workers`` torch threads;
* fedlora: a Flower simulation on Ray with ``--workers`` single-CPU workers, timed from the end
  of round 0 to the end of the last round (Ray start-up, model loading in the workers and the
  round-0 evaluation are reported separately), minus the server-side evaluation time.

It prints one JSON line with both times per round and their ratio. Target: fedlora's
per-round time within 1.25x of the bare loop's on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch


def bare_rounds(cfg, rounds: int, threads: int) -> float:
    """Seconds per round of the plain loop (no Flower, no Ray, no messages)."""
    from fedlora.aggregation.maths import sample_weights, weighted_mean_states
    from fedlora.clients.train import client_update
    from fedlora.tasks.data import client_partitions
    from fedlora.model.pretrained import build_model
    from fedlora.strategies import get_strategy

    torch.set_num_threads(threads)
    task = cfg.task_spec()
    data = task.dataset()
    parts = client_partitions(task, cfg.clients, cfg.partition, cfg.seed)
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = task.training_examples(bundle.tokenizer, cfg.max_length)
    strategy = get_strategy(cfg.strategy)
    trained = strategy.trained_parts
    state = bundle.state(("A", "B", "R", "head"))
    sampler = random.Random(cfg.seed)  # draws the same clients as the server's sampler
    rng = random.Random(cfg.seed + 1)
    started = time.perf_counter()
    for _ in range(rounds):
        updates, sizes = [], []
        for client in sampler.sample(range(cfg.clients), cfg.clients_per_round):
            bundle.load(state)  # the same swap-in a fedlora client does
            params = bundle.set_trainable(trained)
            batches = train.sample_steps(parts[client], cfg.batch_size, cfg.local_steps, rng)
            client_update(bundle.model, params, batches, cfg.lr, loss=task.loss)
            updates.append(bundle.state(trained))
            sizes.append(len(parts[client]))
        state = {**state, **weighted_mean_states(updates, sample_weights(sizes))}
    return (time.perf_counter() - started) / rounds


def fedlora_rounds(cfg, out: Path) -> dict:
    """Seconds per round of the simulation, from its results rows, without evaluation time."""
    from fedlora.simulate import run

    summary = run(cfg, out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    eval_s = summary["eval_s_total"] / summary["evaluations"]
    # rows[0] is written after round 0's evaluation: the span holds the other evaluations
    span = rows[-1]["wall_s"] - rows[0]["wall_s"] - (summary["evaluations"] - 1) * eval_s
    per_round = span / (rows[-1]["round"] - rows[0]["round"])  # rows only where it evaluated
    return {"round_s": per_round, "startup_s": rows[0]["wall_s"], "eval_s": eval_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="topic")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="CPU cores used by either side")
    args = parser.parse_args()

    from fedlora.config import RunConfig

    cfg = RunConfig.from_dict({"task": args.task, "strategy": args.strategy, "clients": args.clients,
                               "clients_per_round": args.clients_per_round, "rounds": args.rounds,
                               "local_steps": args.local_steps, "batch_size": args.batch_size,
                               "eval_every": args.rounds})
    bare_s = bare_rounds(cfg, args.rounds, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        sim = fedlora_rounds(cfg, Path(tmp) / "run")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
                   f"available, {args.workers} used", "task": cfg.task, "strategy": args.strategy,
        "clients": cfg.clients, "clients_per_round": cfg.clients_per_round,
        "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "rounds": args.rounds,
        "bare_round_s": round(bare_s, 2), "fedlora_round_s": round(sim["round_s"], 2),
        "ratio": round(sim["round_s"] / bare_s, 3),
        "fedlora_startup_s": round(sim["startup_s"], 1), "server_eval_s": round(sim["eval_s"], 2)}))


if __name__ == "__main__":
    main()
