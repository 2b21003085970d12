"""Client updates per second and peak memory of one worker: one client at a time or K per pass.

    python experiments/bench/client_batching.py [--task topic] [--strategy fedsb] [--clients 10]
        [--steps 8] [--ks 1,2,5,10] [--precisions fp32,auto] [--repeats 2] [--warmup 1]
        [--engines today,bare,...] [--cores N] [--together]

Every configuration runs in a fresh process with one torch thread (a Ray worker with
``client_cpus=1``) and trains the same ``--clients`` sampled clients from the same messages (the
strategy's own ``configure_train``; Fed-SB's one-time set-up round is skipped, so its clients
start from the initial factors): ``--steps`` local steps at the task's batch size, one round to
warm up (``--warmup 0``: none) and ``--repeats`` timed rounds, the best kept. It prints one
JSON line per configuration and a table:

* ``today``: the ClientApp's ``train`` handler, one message per client (today's engine);
* ``hosted K``: one packed message of all the clients to a host node, trained K at a time in one
  pass per step (``client_batch=K``; K=1: one after another on the host);
* ``bare``: a plain PyTorch loop over the clients (load the adapter, AdamW, the task's loss,
  autocast for bf16), no Flower message, no host;
* ``together K``: (``--together``) ``fedlora.clients.batched.train_together`` called directly,
  K clients a call: the batched pass without the ClientApp around it;
* ``bare-batched K``: a plain PyTorch loop over chunks of K clients, each chunk's rows in one
  pass through one copy of the base with the K clients' adapters stacked (the modules of
  ``fedlora.model.stacked``), one collate of all rows (a smaller batch topped up with copies
  of its first example, left out of its mean) and ordinary dropout over the whole batch (no
  per-client random streams, no per-client length checks, no ClientApp): the fastest batched
  arrangement of the same work, not one whose numbers equal each client's alone.

A bare arrangement is either one single-thread process per core (``bare``) or one process
doing K clients a pass with every core (``bare-batched K`` with ``--threads`` = ``--cores``, run
last at the largest K).

Rates are client updates per CPU-second of the process (``time.process_time``: on a machine
shared with other jobs the CPU time a worker gets varies, its work per CPU-second much less)
and per wall-second; peak memory is the process's maximum resident set size (model, data,
activations). The table's "machine" column is the CPU-second rate times ``--cores``: one
single-thread worker per core, or one process keeping every core busy.

``precision=auto`` is bf16 autocast on a CPU with AMX or AVX-512 BF16 (fp32 elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(args) -> dict:
    """One configuration, in this process: the clients' updates, timed after a warm-up."""
    import torch

    torch.set_num_threads(args.threads)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.clients.app import train
    from fedlora.clients.batched import ClientSteps, RandomStream, train_together
    from fedlora.clients.host import HOSTED, pack
    from fedlora.config import RunConfig, client_config
    from fedlora.model import pretrained as models
    from fedlora.model.adapters import part_of
    from fedlora.model.stacked import stacked_clients, stacked_keys
    from fedlora.strategies import get_strategy

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = RunConfig.from_dict({"task": args.task, "strategy": args.strategy,
                               "clients_per_round": args.clients, "local_steps": args.steps,
                               "precision": args.precision,
                               "clients": 100 if args.task == "topic" else 20})
    data = cfg.task_spec().dataset()
    num_labels = len(data.label_names)
    bundle = models.cached_model(cfg.model_spec(num_labels))
    strategy = get_strategy(cfg.strategy).from_config(cfg, bundle.head_keys)
    strategy.register_nodes({10 + p: p for p in range(cfg.clients)})
    config = ConfigRecord(client_config(cfg, num_labels))
    state = ArrayRecord(bundle.initial_state)
    contexts: dict[int, Context] = {}

    def context(node: int, partition: int, partitions: int) -> Context:
        return contexts.setdefault(node, Context(run_id=1, node_id=node, state=RecordDict(),
                                                 run_config={}, node_config={
                                                     "partition-id": partition,
                                                     "num-partitions": partitions}))

    def messages(server_round: int) -> list[Message]:
        return list(strategy.configure_train(server_round, state, config, None))

    def local_rounds(server_round: int):
        """Each client's start state and step indices, as its ClientApp would draw them."""
        from fedlora.clients.app import begin_training

        rounds = []
        for message in messages(server_round):
            node = message.metadata.dst_node_id
            local = begin_training(message, context(node, node - 10, cfg.clients))
            rounds.append((local, RandomStream.capture("cpu")))
        return rounds

    # Each engine: what it does before the timed part (a bare loop gets its clients' states
    # and steps ready; fedlora's engines start from the messages), and the timed part.
    def today(server_round):
        sent = messages(server_round)

        def timed():
            for message in sent:
                node = message.metadata.dst_node_id
                train(message, context(node, node - 10, cfg.clients))
        return timed

    def hosted(server_round):
        sent = messages(server_round)
        content = pack({m.metadata.dst_node_id - 10: m.content for m in sent})
        content[HOSTED] = ConfigRecord({"partition-ids": [m.metadata.dst_node_id - 10 for m in sent],
                                        "num-partitions": cfg.clients, "client-batch": args.k})
        packed = Message(content=content, dst_node_id=1, message_type="train")
        return lambda: train(packed, context(1, 0, 1))

    def bare(server_round):
        model, loss_of = bundle.model, cfg.task_spec().loss
        rounds = local_rounds(server_round)

        def timed():
            for local, _ in rounds:
                bundle.load(local.start)
                trainable = bundle.set_trainable(local.trained)
                optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
                model.train()
                for indices in local.steps:
                    batch = local.setup.batches.collate(indices)
                    with models.autocast(model):
                        loss = loss_of(model, batch, "mean")
                        loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss.item()
                bundle.state(local.trained)
        return timed

    def together(server_round):
        """fedlora's batched local round (``train_together``) called directly, K clients a call."""
        rounds = local_rounds(server_round)
        first = rounds[0][0]
        keys = [k for k in bundle.shapes() if part_of(k, bundle.head_keys) in first.trained]

        def timed():
            for start in range(0, len(rounds), args.k):
                chunk = rounds[start:start + args.k]
                steps = [ClientSteps(local.start, local.steps, cfg.lr, cfg.lr,
                                     copy.deepcopy(stream)) for local, stream in chunk]
                train_together(bundle.model, bundle.head_keys, keys, steps, first.setup.batches,
                               first.setup.task.loss)
        return timed

    def bare_batched(server_round):
        """Plain PyTorch: K clients' stacked adapters, all their rows in one pass per step."""
        model, head_keys = bundle.model, bundle.head_keys
        rounds = [local for local, _ in local_rounds(server_round)]
        first = rounds[0]
        loss_of, batches = first.setup.task.loss, first.setup.batches
        own = model.state_dict()

        def timed():
            for start in range(0, len(rounds), args.k):
                chunk = rounds[start:start + args.k]
                stacks = {key: torch.stack([local.start[key] for local in chunk]).to(own[key].dtype)
                          for key in stacked_keys(model, head_keys)}
                trained = [stacks[key].requires_grad_() for key in stacks
                           if part_of(key, head_keys) in first.trained]
                optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
                model.train()
                with stacked_clients(model, head_keys, stacks):
                    for step in range(len(first.steps)):
                        rows = [local.steps[step] for local in chunk]
                        most = max(len(r) for r in rows)  # a short batch topped up, not counted
                        batch = batches.collate([i for r in rows for i in r + r[:1] * (most - len(r))])
                        with models.autocast(model):
                            per_example = loss_of(model, batch, "none").reshape(len(chunk), most)
                            sum(per_example[k, :len(r)].mean() for k, r in enumerate(rows)).backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                [{key: stacks[key][k].detach().clone() for key in stacks} for k in range(len(chunk))]
        return timed

    engine = {"today": today, "hosted": hosted, "bare": bare, "together": together,
              "bare-batched": bare_batched}[args.engine]
    if args.warmup:
        engine(1)()  # warm-up: caches, the first allocations
    times = []
    for repeat in range(args.repeats):
        timed = engine(2 + repeat)
        cpu, wall = time.process_time(), time.perf_counter()
        timed()
        times.append((time.process_time() - cpu, time.perf_counter() - wall))
    cpu = min(t[0] for t in times)
    wall = min(t[1] for t in times)
    return {"engine": args.engine, "k": args.k, "threads": args.threads,
            "precision": args.precision, "task": args.task,
            "strategy": args.strategy, "clients": args.clients, "steps": args.steps,
            "updates_per_cpu_s": round(args.clients / cpu, 4),
            "updates_per_wall_s": round(args.clients / wall, 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def configurations(args) -> list[list[str]]:
    """Each precision's engines, interleaved: today, bare, hosted and bare-batched at every K
    (``--together``: also ``train_together`` alone), then the one-process bare arrangement
    (``bare-batched`` at the largest K with every core); ``--engines`` keeps only those named
    (``bare-batched-all``: the one-process arrangement)."""
    plans = []
    ks = [int(k) for k in args.ks.split(",")]
    for precision in args.precisions.split(","):
        common = ["--precision", precision, "--threads", "1"]
        plans.append(["--engine", "today", "--k", "1", *common])
        plans.append(["--engine", "bare", "--k", "1", *common])
        for k in ks:
            plans.append(["--engine", "hosted", "--k", str(k), *common])
            if k > 1:
                plans.append(["--engine", "bare-batched", "--k", str(k), *common])
                if args.together:
                    plans.append(["--engine", "together", "--k", str(k), *common])
        plans.append(["--engine", "bare-batched-all", "--k", str(max(ks)), "--precision",
                      precision, "--threads", str(args.cores)])
    if args.engines:
        plans = [p for p in plans if p[1] in args.engines.split(",")]
    for plan in plans:
        plan[1] = plan[1].removesuffix("-all")
    return plans


def machine() -> str:
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1] for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()]
    return f"{name}, {os.cpu_count()} cores, bf16: {'+'.join(bf16) or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="topic")
    parser.add_argument("--strategy", default="fedsb")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ks", default="1,2,5,10")
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="1: one untimed round first")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="threads of the one-process bare arrangement; workers per machine")
    parser.add_argument("--together", action="store_true", help="also time train_together alone")
    parser.add_argument("--engines", default=None,
                        help="comma-separated: only these (today, bare, hosted, bare-batched, "
                             "bare-batched-all, together)")
    parser.add_argument("--engine", default=None, help="(internal) run one configuration here")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(measure(args)), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    common = ["--task", args.task, "--strategy", args.strategy, "--clients", str(args.clients),
              "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup",
              str(args.warmup)]
    results = []
    for plan in configurations(args):
        threads = plan[plan.index("--threads") + 1]
        done = subprocess.run([sys.executable, __file__, *common, *plan], capture_output=True,
                              text=True, env={**env, "OMP_NUM_THREADS": threads})
        if done.returncode != 0:
            print(f"failed (exit {done.returncode}): {plan}: {done.stderr.strip()[-300:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    # The machine's rate: a single-thread worker's updates per CPU-second times the workers
    # (cores); a process with every core: its updates per CPU-second times the cores (its
    # threads kept busy), so both are CPU-time rates and a shared machine's load cancels out.
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}; {args.task}, "
          f"{args.strategy}, {args.clients} clients x {args.steps} steps, best of {args.repeats}")
    print(f"{'precision':<9} {'engine':<13} {'K':>3} {'thr':>3} {'upd/cpu-s':>9} {'upd/wall-s':>10} "
          f"{'machine upd/s':>13} {'peak MiB':>8} {'vs today fp32':>13}")
    baseline = next((r["updates_per_cpu_s"] for r in results
                     if r["engine"] == "today" and r["precision"] == "fp32"), None)
    for r in results:
        ratio = f"{r['updates_per_cpu_s'] / baseline:.2f}x" if baseline else "-"
        print(f"{r['precision']:<9} {r['engine']:<13} {r['k']:>3} {r['threads']:>3} "
              f"{r['updates_per_cpu_s']:>9.3f} {r['updates_per_wall_s']:>10.3f} "
              f"{r['updates_per_cpu_s'] * args.cores:>13.3f} {r['peak_rss_mib']:>8} {ratio:>13}")


if __name__ == "__main__":
    main()
