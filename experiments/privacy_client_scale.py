"""How many clients per round client-level DP needs on the default task to keep its utility.

The client-level sweep (experiments/privacy_sweep_client.sh: FedSVD, 100 clients, Poisson
q = 0.1, so ~10 clients a round, 25 rounds, C = 1) learns nothing at epsilon 8: the noise std per
coordinate of the mean update, sigma C / m, is 0.076 at m = 10. A federation with hundreds of
clients a round cannot be simulated on 2 cores, but its noise can: each run here is the sweep's
exact setting with ``dp.noise_multiplier`` fixed so that the noise on the mean of ~10 updates has
the std that m clients a round would get at the target epsilon (sigma planned by the accountant
for q = m / N over the same rounds and delta; N = m / q with the sweep's q = 0.1). It measures
utility at that noise level; the epsilon a run reports is the 100-client run's, not m's.

What differs from a real federation of m a round: the mean still averages ~10 clipped updates,
so it varies more from round to round than a mean over m would (the emulation is pessimistic
there); the noise, the clipping and everything else are the same.

    python experiments/privacy_client_scale.py [--per-round 160 ...] [--seeds 0]
        [--clipping fixed|adaptive] [KEY=VALUE ...]

Writes experiments/results/privacy-client-scale/: runs/m<M>[_adaptive]_seed<S>/ (a normal run
directory), logs/, runs.csv and rounds.csv (``fedlora.report.archive``: the numbers of every run
there, earlier ones included, which git keeps instead of the run folders), and scale.md, the
table over every finished run in runs.csv (one epsilon per folder: m, clipping, sigma, noise std
of the mean, final accuracy, the share of FedSVD's no-DP gain over the majority class kept,
against the no-DP runs in the client-level sweep's sweep.csv). Resumable: a run with a
summary.json is skipped.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from fedlora.privacy.client_level import noise_std_of_mean, plan_client_noise_multiplier
from fedlora.report.archive import archive
from fedlora.tasks.classification import load_chatterbot

RESULTS = Path(__file__).parent / "results"
SWEEP = RESULTS / "privacy-client"
OUT = RESULTS / "privacy-client-scale"
# the client-level sweep's setting (experiments/privacy_sweep_client.sh); the rest are defaults
TOTAL_CLIENTS, EXPECTED_PER_ROUND, ROUNDS, DELTA, CLIP = 100, 10, 25, 1e-5, 1.0
SETTING = ["strategy=fedsvd", f"clients={TOTAL_CLIENTS}", f"clients_per_round={EXPECTED_PER_ROUND}",
           f"rounds={ROUNDS}", "dp.mode=client", f"dp.delta={DELTA}", f"dp.clip={CLIP}",
           "weighting=uniform"]
SAMPLE_RATE = EXPECTED_PER_ROUND / TOTAL_CLIENTS


def emulated_noise_multiplier(per_round: int, epsilon: float) -> tuple[float, float, float]:
    """(sigma planned for ``per_round`` clients a round at q = SAMPLE_RATE, the noise std of
    their mean, the sigma that gives ~EXPECTED_PER_ROUND clients' mean that std)."""
    sigma = plan_client_noise_multiplier(epsilon, DELTA, per_round, round(per_round / SAMPLE_RATE),
                                         ROUNDS)
    std = noise_std_of_mean(sigma, CLIP, per_round)
    return sigma, std, std * EXPECTED_PER_ROUND / CLIP


def final_accuracy(run: Path) -> float | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text())["final_accuracy"] if summary.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-round", type=int, nargs="+", default=[160],
                        help="clients a round whose noise level to emulate")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--clipping", choices=("fixed", "adaptive"), default="fixed",
                        help="dp.clipping; adaptive starts at C and follows the median update "
                             "norm (the sigma given is then the effective one, as planned)")
    parser.add_argument("keys", nargs="*", help="extra KEY=VALUE settings for every run")
    args = parser.parse_args()

    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    for per_round in args.per_round:
        sigma, std, emulated = emulated_noise_multiplier(per_round, args.epsilon)
        for seed in args.seeds:
            name = run_name(per_round, args.clipping, seed)
            run = OUT / "runs" / name
            if final_accuracy(run) is None:
                print(f"{name}: sigma {sigma:.3f} for {per_round} a round, noise std of the mean "
                      f"{std:.5f}, dp.noise_multiplier={emulated:.5f} ...", flush=True)
                with (OUT / "logs" / f"{name}.log").open("w") as log:
                    subprocess.run([sys.executable, "-m", "fedlora.simulate", *SETTING,
                                    f"dp.clipping={args.clipping}",
                                    f"dp.noise_multiplier={emulated}", f"seed={seed}",
                                    f"out={run}", *args.keys], stdout=log, stderr=subprocess.STDOUT,
                                   check=True)

    archive([OUT], OUT)
    write_table(args.epsilon, load_chatterbot().test.majority_share())


def run_name(per_round: int, clipping: str, seed: int) -> str:
    return f"m{per_round}{'_adaptive' if clipping == 'adaptive' else ''}_seed{seed}"


def finished_rows(path: Path) -> list[dict]:
    """The rows of a runs.csv (``fedlora.report.archive``) or sweep.csv of finished runs."""
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("finished", "1") == "1"]


def write_table(epsilon: float, majority: float) -> None:
    """scale.md over every finished run in OUT/runs.csv (not only this call's)."""
    rows = []
    for run in finished_rows(OUT / "runs.csv"):
        found = re.fullmatch(r"runs/m(\d+)(_adaptive)?_seed(\d+)", run["run"])
        if found:
            per_round = int(found[1])
            rows.append((per_round, "adaptive" if found[2] else "fixed", int(found[3]),
                         *emulated_noise_multiplier(per_round, epsilon),
                         float(run["final_accuracy"])))
    no_dp = [float(run["final_accuracy"]) for run in finished_rows(SWEEP / "sweep.csv")
             if run["epsilon_target"] == "inf"]
    reference = statistics.mean(no_dp) if no_dp else None
    lines = [f"Noise of m clients a round at ε = {epsilon:g} (q = {SAMPLE_RATE:g}, {ROUNDS} "
             f"rounds, δ = {DELTA:g}, C = {CLIP:g} to start), emulated on {TOTAL_CLIENTS} clients; "
             + (f"FedSVD's no-DP final accuracy {reference:.3f} (mean of {len(no_dp)} seed(s) of "
                f"the client-level sweep), " if reference is not None else "")
             + f"majority class {majority:.3f}.\n",
             "| m a round | clipping | seed | σ (accountant) | noise std of the mean "
             "| dp.noise_multiplier | final accuracy | no-DP gain kept |",
             "|---|---|---|---|---|---|---|---|"]
    for per_round, clipping, seed, sigma, std, emulated, accuracy in sorted(rows):
        kept = ("–" if reference is None
                else f"{(accuracy - majority) / (reference - majority):.0%}")
        lines.append(f"| {per_round} | {clipping} | {seed} | {sigma:.3f} | {std:.5f} | "
                     f"{emulated:.5f} | {accuracy:.3f} | {kept} |")
    (OUT / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
