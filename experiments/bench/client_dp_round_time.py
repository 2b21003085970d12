"""Client-level DP's cost per round: the same simulation with and without ``dp.mode=client``.

    python experiments/bench/client_dp_round_time.py [--strategy fedsvd] [--rounds 5]

Runs ``python -m fedlora.simulate`` twice back to back (100 clients, the defaults otherwise;
the DP run at dp.epsilon=3) and compares the training time per client update (Poisson sampling
makes the number of clients per round vary), from the rows' ``wall_s`` (round 0's row to the
last, minus the server-side evaluation time in summary.json), so Ray's start-up and the
evaluation are left out. Prints one table row for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def training_seconds(run_dir: Path) -> tuple[float, int, int]:
    """(training seconds, training rounds, client updates) of a run: wall time from round 0's
    row to the last, less the server-side evaluations; the updates from participation.csv
    (the rows count no clients under DP)."""
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_per_row = summary["eval_s_total"] / summary["evaluations"]
    training = rows[-1]["wall_s"] - rows[0]["wall_s"] - eval_per_row * (len(rows) - 1)
    sampled = [line.split(",")[1:] for line in
               (run_dir / "participation.csv").read_text().splitlines()[1:] if line]
    return training, rows[-1]["round"], sum(flag == "1" for row in sampled for flag in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedsvd")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a bench, not a private run: it publishes the client sample to count the updates
        for label, extra in (("no DP", []), ("client-level DP", ["dp.mode=client", "dp.epsilon=3",
                                                                 "dp.publish_participation=true"])):
            out = Path(tmp) / label.replace(" ", "-")
            subprocess.run([sys.executable, "-m", "fedlora.simulate", f"strategy={args.strategy}",
                            "clients=100", f"rounds={args.rounds}", f"out={out}", *extra],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[label] = training_seconds(out)
    (plain, rounds, plain_updates), (private, _, private_updates) = times["no DP"], times["client-level DP"]
    # Poisson sampling trains a varying number of clients per round: compare per client update
    ratio = (private / private_updates) / (plain / plain_updates)
    print("| strategy | rounds | no DP: s/round (client updates) | client-level DP: s/round "
          "(client updates) | ratio per client update |")
    print("|---|---|---|---|---|")
    print(f"| {args.strategy} | {rounds} | {plain / rounds:.2f} ({plain_updates}) | "
          f"{private / rounds:.2f} ({private_updates}) | **{ratio:.2f}** |")


if __name__ == "__main__":
    main()
