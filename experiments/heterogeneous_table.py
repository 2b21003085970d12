"""The table and plots of ``experiments/compare_heterogeneous.sh``, from the archived numbers.

    python experiments/heterogeneous_table.py experiments/results/heterogeneous

Reads ``runs.csv`` and ``rounds.csv`` (``python -m fedlora.report.archive``: every number of
every run, which git keeps instead of the run folders) and writes, into the same folder:

* ``comparison.csv``: one row per setting and method over its seeds: the setting (the run's
  folder under ``runs/``: ``default-ranks``, ``default-r16``, ...), the number of seeds, the final
  primary metric (accuracy or exact match: mean, sample std, min and max over seeds), the best
  one (mean), the final score of each rank tier (the model a client of that rank holds after its
  download; mean over seeds, as JSON), and the total bytes up and down (mean, in MB);
* ``comparison.md``: that table in markdown;
* ``<task>_score_vs_round.png``: the mean primary metric against the round, the different-rank
  runs solid, the homogeneous bounds (rank 16 and rank 2) dashed and dotted;
* ``<task>_tiers.png``: each method's final score per rank tier with client_ranks.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

TIERS = ("2", "4", "8", "16")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def setting_of(run: str) -> str:
    """``runs/default-ranks/flora-seed0`` -> ``default-ranks``."""
    parts = run.split("/")
    return parts[parts.index("runs") + 1] if "runs" in parts else parts[0]


def summarise(runs: list[dict], rounds: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run["finished"] == "1":
            groups.setdefault((setting_of(run["run"]), run["strategy"]), []).append(run)
    rows = []
    for (setting, strategy), members in sorted(groups.items()):
        metric = members[0]["primary_metric"]
        finals = [float(run[f"final_{metric}"]) for run in members]
        tiers: dict[str, list[float]] = {}
        for run in members:
            last = [r for r in rounds if r["run"] == run["run"]][-1]
            for tier, scores in json.loads(last.get("tiers") or "{}").items():
                tiers.setdefault(tier, []).append(float(scores[metric]))
        rows.append({
            "setting": setting, "strategy": strategy, "metric": metric, "n": len(members),
            "seeds": " ".join(sorted(run["seed"] for run in members)),
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_min": min(finals), "final_max": max(finals),
            "best_mean": statistics.mean(float(run[f"best_{metric}"]) for run in members),
            "tiers": json.dumps({t: round(statistics.mean(v), 4) for t, v in
                                 sorted(tiers.items(), key=lambda item: int(item[0]))}),
            "bytes_up_mb": statistics.mean(float(run["bytes_up_total"]) for run in members) / 1e6,
            "bytes_down_mb": statistics.mean(float(run["bytes_down_total"]) for run in members) / 1e6,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["setting", "method", "seeds", "final (mean ± std; min–max)", "best",
              *[f"tier {t}" for t in TIERS], "MB up", "MB down"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        tiers = json.loads(row["tiers"])
        lines.append("| " + " | ".join([
            row["setting"], row["strategy"], row["seeds"],
            f"{row['final_mean']:.3f} ± {row['final_std']:.3f} ({row['final_min']:.3f}–"
            f"{row['final_max']:.3f})", f"{row['best_mean']:.3f}",
            *[f"{tiers[t]:.3f}" if t in tiers else "" for t in TIERS],
            f"{row['bytes_up_mb']:.1f}", f"{row['bytes_down_mb']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def plots(folder: Path, runs: list[dict], rounds: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = {run["run"]: run for run in runs if run["finished"] == "1"}
    for task in sorted({row["setting"].split("-")[0] for row in rows}):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        colours = {}
        task_rows = [row for row in rows if row["setting"].startswith(task + "-")]
        for row in task_rows:
            curves = [[(int(r["round"]), float(r[row["metric"]])) for r in rounds if r["run"] == name]
                      for name, run in finished.items()
                      if setting_of(name) == row["setting"] and run["strategy"] == row["strategy"]]
            points = sorted({x for curve in curves for x, _ in curve})
            mean = [statistics.mean(y for curve in curves for x2, y in curve if x2 == x) for x in points]
            style = {"ranks": "-", "r16": "--", "r2": ":"}[row["setting"].split("-", 1)[1]]
            line, = axes.plot(points, mean, style, color=colours.get(row["strategy"]),
                              label=f"{row['strategy']} {row['setting'].split('-', 1)[1]}")
            colours.setdefault(row["strategy"], line.get_color())
        axes.set_xlabel("round")
        axes.set_ylabel(task_rows[0]["metric"].replace("_", " "))  # the task's, not the first row's
        axes.set_title(f"{task}: client_ranks=[2,4,8,16] (solid), rank 16 (dashed), rank 2 (dotted)")
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(folder / f"{task}_score_vs_round.png", dpi=120)
        plt.close(figure)

        ranked = [row for row in rows if row["setting"] == f"{task}-ranks"]
        if not ranked:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(TIERS)
        for i, tier in enumerate(TIERS):
            values = [json.loads(row["tiers"]).get(tier, float("nan")) for row in ranked]
            axes.bar([j + i * width for j in range(len(ranked))], values, width, label=f"rank {tier}")
        axes.set_xticks([j + 0.4 - width / 2 for j in range(len(ranked))],
                        [row["strategy"] for row in ranked])
        axes.set_ylabel(f"final {ranked[0]['metric'].replace('_', ' ')}")
        axes.set_title(f"{task}: the model each rank tier holds after its download")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / f"{task}_tiers.png", dpi=120)
        plt.close(figure)


def main(folder: str) -> None:
    folder = Path(folder)
    runs, rounds = read_csv(folder / "runs.csv"), read_csv(folder / "rounds.csv")
    rows = summarise(runs, rounds)
    with (folder / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (folder / "comparison.md").write_text(table)
    plots(folder, runs, rounds, rows)
    print(table, end="")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/heterogeneous_table.py FOLDER")
    main(sys.argv[1])
