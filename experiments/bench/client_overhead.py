"""fedlora's overhead over a bare PyTorch loop doing the same client work.

    python experiments/bench/client_overhead.py [--task topic] [--strategy fedavg]
        [--clients N] [--clients-per-round N] [--rounds 3] [--local-steps N] [--batch-size N]
        [--workers 2] [--bare threads|processes|none] [--precision fp32|auto|bf16]
        [--client-batch K] [--client-cpus C]

Sizes left out take the run's defaults (100 clients) and the task's run defaults (topic: 10
clients a round, 8 steps at batch 16; arithmetic: 2 a round, 8 steps at batch 8 on SmolLM2-135M).

Both sides train the same clients (the same partitions, sampled with the same seed), the same
local steps and batch size, from the same global state, and aggregate with the same maths:

* bare: a plain loop over the clients, either one process with ``--workers`` torch threads
  (``--bare threads``) or ``--workers`` single-thread processes, each training its share of
  the round's clients (``--bare processes``; the adapters travel by pipe, the aggregation is
  in the parent);
* fedlora: a Flower simulation on Ray with ``--workers`` single-CPU workers, timed from the end
  of round 0 to the end of the last round (Ray start-up, model loading in the workers and the
  round-0 evaluation are reported separately), minus the server-side evaluation time.

``--bare none`` times the simulation alone. ``--precision`` applies to both sides,
``--client-batch`` and ``--client-cpus`` to fedlora's (the bare loop autocasts as a client
does; ``--client-batch`` K > 1 is fedlora's batched training, the bare loop stays one client at
a time). It prints one JSON line with both times per round and their ratio. Target: fedlora's
per-round time within 1.25x of the bare loop's on CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import tempfile
import time
from pathlib import Path

import torch


def bare_rounds(cfg, rounds: int, threads: int, processes: int = 0) -> float:
    """Seconds per round of the plain loop (no Flower, no Ray, no messages): one process with
    ``threads`` torch threads, or (``processes`` > 0) that many single-thread processes."""
    from fedlora.aggregation.maths import sample_weights, weighted_mean_states

    torch.set_num_threads(threads)
    bundle, train, parts, trained = _bare_client(cfg)
    state = bundle.state(("A", "B", "R", "head"))
    sampler = random.Random(cfg.seed)  # draws the same clients as the server's sampler
    rng = random.Random(cfg.seed + 1)
    pool = None
    if processes:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(processes, initializer=_start_worker, initargs=(cfg,))
        pool.map(_worker_ready, range(processes))  # each worker has built its model
    started = time.perf_counter()
    for _ in range(rounds):
        clients = sampler.sample(range(cfg.clients), cfg.clients_per_round)
        # the batches (collated) are drawn in client order, as the single-process loop draws them
        work = [(state, list(train.sample_steps(parts[c], cfg.batch_size, cfg.local_steps, rng)))
                for c in clients]
        if pool is None:
            updates = [_train_client(bundle, trained, cfg, start, steps)
                       for start, steps in work]
        else:
            updates = pool.starmap(_worker_train, work, chunksize=-(-len(work) // processes))
        sizes = [len(parts[c]) for c in clients]
        state = {**state, **weighted_mean_states(updates, sample_weights(sizes))}
    seconds = (time.perf_counter() - started) / rounds
    if pool is not None:
        pool.close()
        pool.join()
    return seconds


def _bare_client(cfg):
    """The model, training examples, partitions and trained parts a bare client needs."""
    from fedlora.model.pretrained import build_model
    from fedlora.strategies import get_strategy
    from fedlora.tasks.data import client_partitions

    task = cfg.task_spec()
    data = task.dataset()
    parts = client_partitions(task, cfg.clients, cfg.partition, cfg.seed)
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = task.training_examples(bundle.tokenizer, cfg.max_length)
    return bundle, train, parts, get_strategy(cfg.strategy).trained_parts


def _train_client(bundle, trained, cfg, start, steps) -> dict:
    from fedlora.clients.train import client_update

    bundle.load(start)  # the same swap-in a fedlora client does
    params = bundle.set_trainable(trained)
    client_update(bundle.model, params, steps, cfg.lr, loss=cfg.task_spec().loss)
    return bundle.state(trained)


_WORKER = {}


def _start_worker(cfg) -> None:
    torch.set_num_threads(1)
    _WORKER["cfg"] = cfg
    _WORKER["client"] = _bare_client(cfg)


def _worker_ready(_) -> bool:
    return True


def _worker_train(start, steps) -> dict:
    bundle, _, _, trained = _WORKER["client"]
    return _train_client(bundle, trained, _WORKER["cfg"], start, steps)


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
    parser.add_argument("--bare", choices=("threads", "processes", "none"), default="threads",
                        help="the bare loop: one process with --workers threads, --workers "
                             "single-thread processes, or none (the simulation alone)")
    parser.add_argument("--precision", default=None, help="both sides (null: the run's default)")
    parser.add_argument("--client-batch", type=int, default=None, help="fedlora's client_batch")
    parser.add_argument("--client-cpus", type=float, default=None, help="fedlora's client_cpus")
    args = parser.parse_args()

    from fedlora.config import RunConfig

    cfg = RunConfig.from_dict({"task": args.task, "strategy": args.strategy, "clients": args.clients,
                               "clients_per_round": args.clients_per_round, "rounds": args.rounds,
                               "local_steps": args.local_steps, "batch_size": args.batch_size,
                               "eval_every": args.rounds, "precision": args.precision,
                               "client_batch": args.client_batch, "client_cpus": args.client_cpus})
    bare_s = None if args.bare == "none" else bare_rounds(
        cfg, args.rounds, args.workers, args.workers if args.bare == "processes" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        sim = fedlora_rounds(cfg, Path(tmp) / "run")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
                   f"available, {args.workers} used", "task": cfg.task, "strategy": args.strategy,
        "clients": cfg.clients, "clients_per_round": cfg.clients_per_round,
        "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "rounds": args.rounds,
        "precision": cfg.precision, "client_batch": cfg.client_batch,
        "client_cpus": cfg.client_cpus, "bare": args.bare,
        "bare_round_s": bare_s and round(bare_s, 2), "fedlora_round_s": round(sim["round_s"], 2),
        "ratio": bare_s and round(sim["round_s"] / bare_s, 3),
        "fedlora_startup_s": round(sim["startup_s"], 1), "server_eval_s": round(sim["eval_s"], 2)}))


if __name__ == "__main__":
    main()
