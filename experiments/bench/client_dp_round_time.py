"""Client-level DP's cost per round: the same simulation with and without ``dp.mode=client``.

    python experiments/bench/client_dp_round_time.py [--strategy fedsvd] [--rounds 5]

Runs ``python -m fedlora.simulate`` twice back to back (100 clients, the defaults otherwise;
the DP run at dp.epsilon=3) and compares the mean time per training round, from the rows'
``wall_s`` (round 0's row to the last, minus the server-side evaluation time in summary.json),
so Ray's start-up and the evaluation are left out. Prints one table row for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def seconds_per_round(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluations = summary["evaluations"]
    eval_per_row = summary["eval_s_total"] / evaluations
    training = rows[-1]["wall_s"] - rows[0]["wall_s"] - eval_per_row * (len(rows) - 1)
    return training / rows[-1]["round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedsvd")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("no DP", []), ("client-level DP", ["dp.mode=client", "dp.epsilon=3"])):
            out = Path(tmp) / label.replace(" ", "-")
            subprocess.run([sys.executable, "-m", "fedlora.simulate", f"strategy={args.strategy}",
                            "clients=100", f"rounds={args.rounds}", f"out={out}", *extra],
                           check=True, stdout=subprocess.DEVNULL)
            times[label] = seconds_per_round(out)
    ratio = times["client-level DP"] / times["no DP"]
    print("| strategy | rounds | no DP s/round | client-level DP s/round | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {args.strategy} | {args.rounds} | {times['no DP']:.2f} | {times['client-level DP']:.2f} | "
          f"**{ratio:.2f}** |")


if __name__ == "__main__":
    main()
