"""The record-level DP table of docs/results/privacy-record.md, from the sweeps' sweep.csv files.

Final accuracy per method and epsilon (mean ± standard deviation over seeds) of the record-level
sweep (experiments/privacy_sweep_record.sh), its own no-DP point, the no-DP point of the methods'
AdamW defaults, and the share of the no-DP gain over the majority class that each method keeps
at epsilon 8: against the better of its two no-DP references, and against the sweep's own.
Then the method ordering at epsilon 1, 3 and 8 with every seed's value. The majority class is
counted on the test split the runs evaluated on (the same data keys as the sweep).

    python experiments/privacy_record_table.py
"""
from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from fedlora.tasks.data import DataSpec
from fedlora.tasks.classification import load_dataset

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data" / "language_id.jsonl"
METHOD_ORDER = ("fedavg", "ffa", "fedsb", "fedsvd")
NAMES = {"fedavg": "FedIT (`fedavg`)", "ffa": "FFA-LoRA (`ffa`)", "fedsb": "Fed-SB (`fedsb`)",
         "fedsvd": "FedSVD (`fedsvd`)"}
EPSILONS = ("1.0", "3.0", "8.0", "32.0", "inf")


def final_accuracies(csv_paths: list[Path], only_epsilon: str | None = None) -> dict:
    """{(strategy, epsilon_target): {seed: final accuracy}} over the rows of the given files."""
    found: dict = defaultdict(dict)
    for path in csv_paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                if only_epsilon is not None and row["epsilon_target"] != only_epsilon:
                    continue
                if row["final_accuracy"]:
                    found[(row["strategy"], row["epsilon_target"])][row["seed"]] = float(row["final_accuracy"])
    return found


def cell(by_seed: dict) -> str:
    values = [by_seed[s] for s in sorted(by_seed)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def kept_share(accuracy: float, reference: float, majority: float) -> float:
    return (accuracy - majority) / (reference - majority)


def kept_cell(at_8: dict, reference: float | None, majority: float) -> str:
    """The mean share kept at epsilon 8, with each seed's share when there are several."""
    if reference is None or not at_8:
        return "–"
    text = f"{kept_share(statistics.mean(at_8.values()), reference, majority):.0%}"
    if len(at_8) > 1:
        text += " (seeds " + ", ".join(f"{kept_share(at_8[s], reference, majority):.0%}"
                                       for s in sorted(at_8)) + ")"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=RESULTS / "privacy-record" / "sweep.csv")
    parser.add_argument("--no-dp", type=Path, nargs="+", default=[
        RESULTS / "privacy-record-adamw" / "sweep.csv",
        RESULTS / "privacy-record-adamw" / "seed1-no-dp" / "sweep.csv"],
        help="sweep.csv files whose no-DP rows are the methods' AdamW-default reference")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    majority = load_dataset(DataSpec(path=str(args.data), text_field="sentence",
                                     label_field="language")).test.majority_share()
    sweep = final_accuracies([args.sweep])
    adamw = final_accuracies(args.no_dp, only_epsilon="inf")
    print(f"majority class: {majority:.4f}\n")
    print("| method | ε = 1 | ε = 3 | ε = 8 | ε = 32 | no DP (this setting) | no DP (AdamW defaults) "
          "| ε = 8 keeps (of the better no DP) | ε = 8 keeps (of this setting's no DP) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in METHOD_ORDER:
        cells = [cell(sweep.get((method, eps), {})) for eps in EPSILONS]
        cells.append(cell(adamw.get((method, "inf"), {})))
        own, other = sweep.get((method, "inf")), adamw.get((method, "inf"))
        references = [statistics.mean(v.values()) for v in (own, other) if v]
        at_8 = sweep.get((method, "8.0"), {})
        for reference in (max(references) if references else None,
                          statistics.mean(own.values()) if own else None):
            cells.append(kept_cell(at_8, reference, majority))
        print(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    print()
    for eps in EPSILONS[:3]:
        ranked = sorted(((statistics.mean(sweep[(m, eps)].values()), m) for m in METHOD_ORDER
                         if sweep.get((m, eps))), reverse=True)
        print(f"ε = {eps}: " + " > ".join(
            f"{m} {mean:.3f} (seeds " + ", ".join(f"{sweep[(m, eps)][s]:.3f}" for s in sorted(sweep[(m, eps)])) + ")"
            for mean, m in ranked))


if __name__ == "__main__":
    main()
