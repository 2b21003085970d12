"""Where a hosted run's rounds go: a least-squares fit of each round's wall time to the number
of clients on that round's busiest host.

    python experiments/bench/round_time.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a finished ``fedlora.simulate`` run with ``client_batch`` > 1 or ``client_hosts``
(its ``results.jsonl``, ``participation.csv`` and ``config.yaml``). Partition p lives on host
p mod H (docs/design/client-batching.md), so a round's busiest host is known from who was
sampled; the round waits for it. The fit

    round seconds = per_client * (clients on the busiest host) + per_round

splits a round into the part that grows with the busiest host's clients (training) and the part
that does not (evaluation, aggregation, messages, the checkpoint). The report gives both, what
perfect balance (every host clients_per_round / H) would have saved, and the run's floor: its
time before round 1 plus the training of every client at per_client on all hosts at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml


def round_loads(run: Path, hosts: int) -> dict[int, list[int]]:
    """Training round -> clients per host (participation.csv's row r is training round r + 1)."""
    loads = {}
    with open(run / "participation.csv") as handle:
        for row in csv.DictReader(handle):
            sampled = [int(key[1:]) for key, value in row.items() if key != "round" and value == "1"]
            per_host = [0] * hosts
            for partition in sampled:
                per_host[partition % hosts] += 1
            loads[int(row["round"]) + 1] = per_host
    return loads


def analyse(run: Path) -> dict:
    from fedlora.config import RunConfig

    cfg = RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    batch, per_round, hosts = cfg.client_batch, cfg.clients_per_round, cfg.hosts
    if hosts is None:
        raise SystemExit(f"{run}: one node per client (client_batch=1, no client_hosts): no hosts to fit")
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    clock = {row["round"]: row["wall_s"] for row in rows}
    loads = round_loads(run, hosts)
    trained = [r for r in sorted(clock) if r >= 1 and r - 1 in clock and r in loads]
    busiest = np.array([max(loads[r]) for r in trained], dtype=float)
    seconds = np.array([clock[r] - clock[r - 1] for r in trained])
    if len(trained) < 3 or np.ptp(busiest) == 0:
        raise SystemExit(f"{run}: too few rounds, or every round equally loaded: nothing to fit")
    (per_client, fixed), *_ = np.linalg.lstsq(np.vstack([busiest, np.ones_like(busiest)]).T,
                                              seconds, rcond=None)
    balanced = math.ceil(per_round / hosts)
    return {"run": str(run), "hosts": hosts, "client_batch": batch, "rounds": len(trained),
            "per_client_s": per_client, "per_round_s": fixed,
            "mean_busiest": busiest.mean(), "balanced_busiest": balanced,
            "rounds_s": seconds.sum(), "imbalance_s": per_client * (busiest.mean() - balanced) * len(trained),
            "before_round_1_s": clock[trained[0] - 1],
            "floor_s": clock[trained[0] - 1] + per_client * per_round / hosts * len(trained),
            "correlation": float(np.corrcoef(busiest, seconds)[0, 1]),
            "last_round_s": clock[max(clock)], "process_s": process_seconds(run)}


def process_seconds(run: Path) -> float | None:
    """The whole process's wall time, where batching_runs.sh wrote it (RUN_DIR.wall)."""
    wall = run.with_name(run.name + ".wall")
    return float(wall.read_text()) if wall.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args().runs:
        a = analyse(run)
        print(f"{a['run']}: {a['hosts']} hosts, client_batch {a['client_batch']}, {a['rounds']} rounds")
        print(f"  round = {a['per_client_s']:.3f} s x clients on the busiest host "
              f"+ {a['per_round_s']:.3f} s  (correlation {a['correlation']:.2f})")
        print(f"  busiest host: {a['mean_busiest']:.2f} clients on average, {a['balanced_busiest']} "
              f"if balanced: {a['imbalance_s']:.1f} s of the rounds' {a['rounds_s']:.1f} s")
        print(f"  before round 1 (start-up, set-up, round 0's evaluation): {a['before_round_1_s']:.1f} s")
        print(f"  floor (that + every client at {a['per_client_s']:.3f} s, hosts all busy, nothing "
              f"else per round): {a['floor_s']:.1f} s")
        if a["process_s"] is not None:
            outside = a["process_s"] - a["last_round_s"]
            print(f"  the process: {a['process_s']:.1f} s, of which {outside:.1f} s outside the "
                  f"server's clock (imports, Ray, writing the results): floor "
                  f"{a['floor_s'] + outside:.1f} s")


if __name__ == "__main__":
    main()
