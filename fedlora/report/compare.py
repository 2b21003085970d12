"""``python -m fedlora.report.compare DIR... [--target ACC] [--out DIR] [--label-by KEY,...]``

Compares finished (or partial) runs from their plain results files only: each run directory's
``results.jsonl`` and ``summary.json`` (``config.yaml`` for a run that has no summary yet).
Runs whose configs differ only in ``seed`` form one group (mean ± sample standard deviation
over the seeds, n shown). A DIR without ``results.jsonl`` whose sub-directories have one (a
Hydra multirun directory) stands for those runs.

Writes ``OUT/comparison.md`` (the table printed on stdout), ``OUT/comparison.csv`` (the same
numbers, unformatted), ``OUT/<metric>_vs_round.png`` and ``OUT/<metric>_vs_bytes.png``.
The metric is the runs' primary metric (``summary.json``'s ``primary_metric``, else the one the
rows hold: ``accuracy`` for classification, ``exact_match`` for generative tasks; all runs
compared must share it). Columns: final and best test metric; total bytes up and down
(one-time costs such as Fed-SB's gradient upload in brackets); bytes up + down sent until the
run first reached the target (default: 90 % of the best final value among all runs); wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from flwr.common.config import flatten_dict

from fedlora.report import plots
from fedlora.core.errors import ConfigError
from fedlora.report.results import human_bytes, primary_metric
from fedlora.core.settings import run_config_values

TARGET_FRACTION = 0.9  # default target: this share of the best final accuracy among the runs
IGNORED_KEYS = ("seed", "out")  # config keys that do not make two runs different methods


@dataclass
class Run:
    """One run directory, read from its plain files."""

    path: Path
    config: dict
    rows: list[dict]
    summary: dict | None  # None while the run has not finished

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def metric(self) -> str:
        """The run's primary metric (accuracy | exact_match)."""
        return primary_metric(self.rows, self.summary)

    @property
    def final_score(self) -> float:
        return self.rows[-1][self.metric]

    @property
    def best_score(self) -> float:
        return max(row[self.metric] for row in self.rows)

    @property
    def bytes_up(self) -> int | None:
        """None: withheld (client-level DP: bytes count the secretly sampled clients)."""
        return self.rows[-1]["bytes_up_cum"]

    @property
    def bytes_down(self) -> int | None:
        return self.rows[-1]["bytes_down_cum"]

    def one_time_bytes(self, direction: str) -> int | None:
        return self.summary[f"one_time_bytes_{direction}"] if self.summary else None

    @property
    def wall_s(self) -> float:
        return self.summary["wall_s"] if self.summary else self.rows[-1]["wall_s"]

    @property
    def epsilon_spent(self) -> float | None:
        """The privacy budget spent: the last non-null ``epsilon`` of the rows (None: no DP)."""
        spent = [row["epsilon"] for row in self.rows if row.get("epsilon") is not None]
        return spent[-1] if spent else None

    def bytes_to_target(self, target: float) -> int | None:
        """Bytes up + down sent until the first evaluated round at or above ``target`` (None:
        not reached, or bytes withheld)."""
        for row in self.rows:
            if row[self.metric] >= target and row["bytes_up_cum"] is not None:
                return row["bytes_up_cum"] + row["bytes_down_cum"]
        return None


def load_run(path) -> Run:
    path = Path(path)
    results = path / "results.jsonl"
    if not results.is_file():
        raise ConfigError(f"{path} has no results.jsonl; pass run directories written by "
                          "python -m fedlora.simulate (its out=DIR)")
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{results} has no rows yet; wait for the run's round 0")
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if summary is not None:
        config = summary["config"]
    elif (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text())
    else:
        raise ConfigError(f"{path} has neither summary.json nor config.yaml; cannot tell which "
                          "run it is")
    return Run(path=path, config=config, rows=rows, summary=summary)


def run_dirs(paths) -> list[Path]:
    """The run directories named by ``paths``: each one itself, or, for a directory holding
    runs (a Hydra multirun), its sub-directories whose ``results.jsonl`` has a row (a run
    that has just started is left out rather than stopping the comparison)."""
    found = []
    for path in map(Path, paths):
        inner = sorted(p.parent for p in path.glob("*/results.jsonl") if p.stat().st_size)
        found += inner if inner and not (path / "results.jsonl").exists() else [path]
    return found


def group_runs(runs: list[Run], label_by=("strategy",)) -> dict[str, list[Run]]:
    """Runs whose configs differ only in seed, under one label each, in first-seen order.

    A label is the values of the ``label_by`` keys; where two groups would get the same one,
    the keys in which they differ are appended (``fedavg rank=4``)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flat = {k: v for k, v in flatten_dict(run_config_values(run.config, null="null")).items()
                if k not in IGNORED_KEYS}
        groups.setdefault(json.dumps(flat, sort_keys=True, default=str), []).append(run)
    configs = {key: json.loads(key) for key in groups}

    def base_label(key: str) -> str:
        return " ".join(str(configs[key].get(k, "")) for k in label_by)

    labelled = {}
    for key, members in groups.items():
        twins = [other for other in groups if base_label(other) == base_label(key)]
        differing = sorted(k for k in configs[key]
                           if len({json.dumps(configs[t].get(k), default=str) for t in twins}) > 1)
        label = " ".join([base_label(key)] + [f"{k}={configs[key].get(k)}" for k in differing])
        labelled[label] = sorted(members, key=lambda run: run.config.get("seed", 0))
    return labelled


def default_target(runs: list[Run]) -> float:
    return TARGET_FRACTION * max(run.final_score for run in runs)


def common_metric(runs: list[Run]) -> str:
    """The primary metric all ``runs`` share; a one-line ``ConfigError`` if they differ."""
    metrics = sorted({run.metric for run in runs})
    if len(metrics) > 1:
        raise ConfigError(f"the runs are scored by different metrics ({', '.join(metrics)}); "
                          "compare runs of one kind of task at a time")
    return metrics[0]


def metric_words(metric: str) -> str:
    return metric.replace("_", " ")


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean, std = plots.mean_std(np.array(values, dtype=float))
    return float(mean), float(std)


def summarise(label: str, runs: list[Run], target: float, metric: str = "accuracy") -> dict:
    """One group's numbers (means and standard deviations over its seeds) of their primary
    ``metric``: ``final_<metric>``, ``best_<metric>``, ``target_<metric>``."""
    to_target = [b for b in (run.bytes_to_target(target) for run in runs) if b is not None]
    one_time_up = [run.one_time_bytes("up") for run in runs]
    one_time_down = [run.one_time_bytes("down") for run in runs]
    up, down = [run.bytes_up for run in runs], [run.bytes_down for run in runs]
    row = {"label": label, "n": len(runs),
           "seeds": " ".join(str(run.config.get("seed")) for run in runs),
           "rounds_done": min(run.rows[-1]["round"] for run in runs),
           "rounds": runs[0].config.get("rounds"),
           "finished": sum(run.finished for run in runs)}
    for name, values in ((f"final_{metric}", [r.final_score for r in runs]),
                         (f"best_{metric}", [r.best_score for r in runs]),
                         ("bytes_up", [] if None in up else up),
                         ("bytes_down", [] if None in down else down),
                         ("one_time_bytes_up", [] if None in one_time_up else one_time_up),
                         ("one_time_bytes_down", [] if None in one_time_down else one_time_down),
                         ("bytes_to_target", to_target),
                         ("epsilon_spent", [r.epsilon_spent for r in runs if r.epsilon_spent is not None]),
                         ("wall_s", [r.wall_s for r in runs])):
        row[f"{name}_mean"], row[f"{name}_std"] = _stats(values)
    row["target_reached"] = len(to_target)
    row[f"target_{metric}"] = target
    return row


def _pm(mean, std, fmt) -> str:
    if mean is None:
        return "–"
    return fmt(mean) if not std else f"{fmt(mean)} ± {fmt(std)}"


def _bytes_cell(row: dict, direction: str) -> str:
    cell = _pm(row[f"bytes_{direction}_mean"], row[f"bytes_{direction}_std"], human_bytes)
    one_time = row[f"one_time_bytes_{direction}_mean"]
    return f"{cell} ({human_bytes(one_time)} one-time)" if one_time else cell


def target_cell(row: dict) -> str:
    if row["bytes_up_mean"] is None:  # bytes withheld (client-level DP)
        return "–"
    if not row["target_reached"]:
        return "not reached"
    cell = _pm(row["bytes_to_target_mean"], row["bytes_to_target_std"], human_bytes)
    return cell if row["target_reached"] == row["n"] else f"{cell} ({row['target_reached']}/{row['n']} reached)"


def rounds_cell(row: dict) -> str:
    partial = row["n"] - row["finished"]
    return (f"{row['rounds_done']}" if not partial else
            f"{row['rounds_done']} of {row['rounds']} ({partial} partial)")


def accuracy_cell(row: dict, name: str) -> str:
    return _pm(row[f"{name}_mean"], row[f"{name}_std"], lambda v: f"{v:.3f}")


SHORT = {"accuracy": "acc", "exact_match": "em"}


def markdown_table(rows: list[dict], metric: str = "accuracy") -> str:
    """The groups as a Markdown table; an ε spent column appears when a run used DP."""
    target = rows[0][f"target_{metric}"]
    private = any(row["epsilon_spent_mean"] is not None for row in rows)
    words = metric_words(metric)
    header = ["method", "n", "rounds", f"final {words}", f"best {words}", "bytes up (one-time)",
              "bytes down (one-time)", f"bytes to {SHORT.get(metric, words)} {target:.3f}",
              "wall time"]
    header[5:5] = ["ε spent"] if private else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], str(row["n"]), rounds_cell(row), accuracy_cell(row, f"final_{metric}"),
                 accuracy_cell(row, f"best_{metric}"), _bytes_cell(row, "up"), _bytes_cell(row, "down"),
                 target_cell(row), _pm(row["wall_s_mean"], row["wall_s_std"], lambda v: f"{v:.0f} s")]
        cells[5:5] = [_pm(row["epsilon_spent_mean"], row["epsilon_spent_std"],
                          lambda v: f"{v:.2f}")] if private else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def compare(paths, out, target: float | None = None, label_by=("strategy",)) -> list[dict]:
    """Read the runs under ``paths``, write the table, CSV and plots to ``out``; return the
    group rows."""
    runs = [load_run(path) for path in run_dirs(paths)]
    metric = common_metric(runs)
    words = metric_words(metric)
    how = "given with --target" if target is not None else \
        f"{TARGET_FRACTION:.0%} of the best final {words} among the runs"
    if target is None:
        target = default_target(runs)
    groups = group_runs(runs, label_by)
    rows = [summarise(label, members, target, metric) for label, members in groups.items()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, metric)
    provenance = "\n".join(f"- {label}: " + ", ".join(str(run.path) for run in members)
                           for label, members in groups.items())
    (out / "comparison.md").write_text(
        f"{table}\nMean ± standard deviation over the n seeds of each group. Target {words} "
        f"{target:.3f} ({how}); bytes to target count up + down until a run first reaches it.\n\n"
        f"Runs:\n{provenance}\n")
    write_csv(out / "comparison.csv", rows)
    curves = {label: [run.rows for run in members] for label, members in groups.items()}
    plots.plot_accuracy_vs_round(curves, out / f"{metric}_vs_round.png", metric=metric)
    plots.plot_accuracy_vs_bytes(curves, out / f"{metric}_vs_bytes.png", metric=metric)
    print(table, end="")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.report.compare", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (or directories of runs)")
    parser.add_argument("--target", type=float, default=None, metavar="ACC",
                        help="primary metric value (accuracy or exact match) for the bytes-to-target column "
                             "(default: 90%% of the best final value)")
    parser.add_argument("--out", default="comparison", metavar="DIR",
                        help="where comparison.md/.csv and the plots go (default: ./comparison)")
    parser.add_argument("--label-by", default="strategy", metavar="KEY[,KEY]",
                        help="config keys naming each group (default: strategy)")
    args = parser.parse_args(argv)
    try:
        if args.target is not None and not 0 < args.target <= 1:
            raise ConfigError(f"--target {args.target} is not an accuracy or exact match; give a "
                              "number in (0, 1]")
        compare(args.dirs, args.out, args.target, tuple(args.label_by.split(",")))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
