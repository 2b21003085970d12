"""docs/results/<name>.md, one page per experiment, generated from experiments/results/<name>/.

An experiment's folder holds what git keeps of it: its summary CSV files (``runs.csv`` and
``rounds.csv`` from ``python -m fedlora.report.archive``, with every number of every run; the
``sweep.csv`` or ``comparison.csv`` its sweep or comparison wrote), its plots, and ``notes.md``,
the page's text: what was run, with which command, and the reading of the results. In the notes
``{{name}}`` stands for a table or a number this script computes from the CSV files (one
function per experiment in ``PAGES``), so the pages' tables cannot drift from the data. Edit
notes.md or rerun the experiment, then regenerate; never edit a page.

    python experiments/make_pages.py            # rewrite docs/results/ and README.md's table
    python experiments/make_pages.py --check    # exit 1 naming each page that is not up to date

README.md's table of the default job's measurements, between its ``default-job`` markers, is
generated here too (from experiments/results/default/).

The majority-class shares are counted from the tasks' test splits (the default task's, and the
language-ID set that experiments/data/make_language_id.py builds), as the experiment scripts do.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
from functools import cache
from pathlib import Path

from fedlora.report.compare import markdown_table
from fedlora.report.results import human_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs" / "results"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")
NAMES = {"fedavg": "FedIT (`fedavg`)", "ffa": "FFA-LoRA (`ffa`)", "fedsb": "Fed-SB (`fedsb`)",
         "fedsvd": "FedSVD (`fedsvd`)", "lorafair": "LoRA-FAIR (`lorafair`)",
         "fedex": "FedEx-LoRA (`fedex`)", "rolora": "RoLoRA (`rolora`)"}
DP_METHODS = ("fedavg", "ffa", "fedsb", "fedsvd")
FILE_WORDS = {
    "runs.csv": "one row per run: the settings that differ between its runs and every number of "
                "its `summary.json` (`python -m fedlora.report.archive`)",
    "rounds.csv": "one row per evaluated round of every run (its `results.jsonl` rows)",
    "measured.csv": "measurements recorded by hand, for runs whose folders were never kept",
    "sweep.csv": "`fedlora.sweep`'s table: one row per finished run",
    "sweep.md": "`fedlora.sweep`'s report: mean ± std per method and ε",
    "comparison.csv": "`fedlora.report.compare`'s table: one row per method, over its seeds",
    "comparison.md": "`fedlora.report.compare`'s report, with the runs it read",
    "multirun.yaml": "Hydra's record of the multirun's settings",
    "scale.md": "the table `experiments/privacy_client_scale.py` prints",
    "README.md": "the probes' settings",
    "centralised-80steps.jsonl": "`experiments/centralised.py`'s output for the generative task",
}


# ---------------------------------------------------------------------------------------------
# reading and formatting


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(text: str) -> float | None:
    return None if text in ("", None) else float(text)


def f3(value: float) -> str:
    return f"{value:.3f}"


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std`` (one value: the value alone)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def share(value: float, reference: float, floor: float) -> float:
    """The share of ``reference``'s gain over ``floor`` (the majority class) ``value`` keeps."""
    return (value - floor) / (reference - floor)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def epsilon_words(target: str) -> str:
    return "no DP" if target in ("inf", "") else f"ε = {float(target):g}"


def by_run(rows: list[dict]) -> dict[str, dict]:
    return {row["run"]: row for row in rows}


def rounds_of(rows: list[dict], run: str) -> list[dict]:
    return [row for row in rows if row["run"] == run]


def typed(row: dict) -> dict:
    """A comparison.csv row with the types ``fedlora.report.compare.markdown_table`` expects."""
    out = {}
    for key, value in row.items():
        if key in ("label", "seeds"):
            out[key] = value
        elif key in ("n", "rounds_done", "rounds", "finished", "target_reached"):
            out[key] = int(value)
        else:
            out[key] = number(value)
    return out


def comparison_table(path: Path) -> str:
    rows = [typed(row) for row in read_csv(path)]
    metric = "exact_match" if "final_exact_match_mean" in rows[0] else "accuracy"
    return markdown_table(rows, metric).rstrip("\n")


@cache
def majority_default() -> float:
    """The majority class's share of the default task's test split."""
    from fedlora.tasks.classification import load_chatterbot

    return load_chatterbot().test.majority_share()


@cache
def majority_language_id() -> float:
    """The same for the record-level DP sweeps' language-ID set (built in a temporary file)."""
    sys.path.insert(0, str(ROOT / "experiments" / "data"))
    import make_language_id

    from fedlora.tasks.classification import load_dataset
    from fedlora.tasks.data import DataSpec

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "language_id.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in make_language_id.rows()))
        return load_dataset(DataSpec(path=str(path), text_field="sentence",
                                     label_field="language")).test.majority_share()


def sweep_finals(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(strategy, epsilon_target): {seed: final accuracy}} of a sweep.csv."""
    found: dict = {}
    for row in read_csv(path):
        found.setdefault((row["strategy"], row["epsilon_target"]), {})[row["seed"]] = \
            float(row["final_accuracy"])
    return found


def run_table(folder: Path, settings: list[str]) -> str:
    """Every run of a folder's runs.csv: its settings, final and best accuracy, ε, wall time."""
    rows = []
    for run in read_csv(folder / "runs.csv"):
        finished = run["finished"] == "1"
        rows.append([f"`{run['run'].rsplit('/', 1)[-1]}`", NAMES[run["strategy"]].split(" ")[0],
                     *[run.get(key) or "–" for key in settings],
                     f3(float(run["final_accuracy"])) if finished else "unfinished",
                     f3(float(run["best_accuracy"])) if finished else "–",
                     f"{float(run['epsilon']):.2f}" if run.get("epsilon") else "–",
                     f"{float(run['wall_s']):.0f} s" if finished else "–"])
    return table(["run", "method", *settings, "final accuracy", "best accuracy", "ε spent",
                  "wall time"], rows)


# ---------------------------------------------------------------------------------------------
# one function per experiment: the values its notes.md uses


def measured_rows(folder: Path) -> list[dict]:
    """measured.csv's rows, in date order; a row that names an archived run (``run``) takes
    that run's numbers from runs.csv."""
    runs = by_run(read_csv(folder / "runs.csv"))
    measured = read_csv(folder / "measured.csv")
    for row in measured:
        if row["run"]:
            run = runs[row["run"]]
            row.update(final_accuracy=run["final_accuracy"], best_accuracy=run["best_accuracy"],
                       bytes_up=human_bytes(int(run["bytes_up_total"])),
                       bytes_down=human_bytes(int(run["bytes_down_total"])),
                       wall_s=run["wall_s"])
    return measured


def default_job_table(folder: Path = RESULTS / "default") -> str:
    """Every measurement of the default job (Fed-SB, 100 clients, seed 0): README and page."""
    rows = [[f"{row['date']}, {row['machine']}", f"{float(row['final_accuracy']):.4f}",
             f"{float(row['best_accuracy']):.4f}" if row["best_accuracy"] else "–",
             f"{row['bytes_up']} / {row['bytes_down']}" if row["bytes_up"] else "–",
             f"{float(row['wall_s']):.0f} s" if row["wall_s"] else "–"]
            for row in measured_rows(folder) if row["strategy"] == "fedsb"]
    return table(["measured", "final accuracy", "best accuracy", "bytes up / down", "wall time"],
                 rows)


def default(folder: Path) -> dict[str, str]:
    runs = by_run(read_csv(folder / "runs.csv"))
    measured = measured_rows(folder)
    centralised = next(row for row in measured if row["strategy"] == "centralised")
    reference = float(centralised["best_accuracy"])
    latest: dict[str, dict] = {}
    for row in measured:  # in date order: the last complete one wins, a quiet machine's first
        quiet = "quiet" in row["machine"]
        earlier = latest.get(row["strategy"])
        if (row["strategy"] != "centralised" and row["best_accuracy"]
                and (earlier is None or quiet or "quiet" not in earlier["machine"])):
            latest[row["strategy"]] = row
    methods = [[f"`strategy={strategy}`" + (" (the default)" if strategy == "fedsb" else ""),
                f3(float(row["final_accuracy"])), f3(float(row["best_accuracy"])),
                f"{100 * float(row['final_accuracy']) / reference:.1f} %",
                f"{row['bytes_up']} / {row['bytes_down']}",
                f"{float(row['wall_s']):.0f} s" + (f"; {float(row['process_s']):.0f} s"
                                                   if row["process_s"] else ""),
                f"{row['date']}, {row['machine']}"]
               for strategy, row in latest.items()]
    methods.insert(0, [f"centralised LoRA, `{centralised['command']}`",
                       f3(float(centralised["final_accuracy"])),
                       f"**{reference:.3f}** ({centralised['note']})", "100 %", "–",
                       f"{float(centralised['wall_s']) / 60:.0f} min (1 thread)",
                       f"{centralised['date']}, {centralised['machine']}"])
    finals = [float(row["final_accuracy"]) for row in measured if row["strategy"] == "fedsb"]
    rolora = runs["rolora-seed0"]
    return {
        "methods": table(["run", "final accuracy", "best", "final vs centralised best",
                          "bytes up / down (total)", "wall time (run; process)", "measured"],
                         methods),
        "spread": default_job_table(folder),
        "spread_range": f"{min(finals):.4f}–{max(finals):.4f}",
        "majority": f3(majority_default()),
        "rolora_up": human_bytes(int(rolora["bytes_up_total"])),
        "rolora_down": human_bytes(int(rolora["bytes_down_total"])),
    }


def methods(folder: Path) -> dict[str, str]:
    runs = read_csv(folder / "runs.csv")
    order = list(dict.fromkeys(run["strategy"] for run in runs))
    seeds = sorted({run["seed"] for run in runs})
    cell = {(run["strategy"], run["seed"]): run for run in runs}
    per_seed = [[NAMES[m], *[f3(float(cell[(m, s)]["final_accuracy"])) for s in seeds],
                 *[f3(float(cell[(m, s)]["initial_accuracy"])) for s in seeds]] for m in order]
    best = max(runs, key=lambda run: float(run["final_accuracy"]))
    return {
        "comparison": comparison_table(folder / "comparison.csv"),
        "per_seed": table(["method", *[f"final, seed {s}" for s in seeds],
                           *[f"round 0, seed {s}" for s in seeds]], per_seed),
        "target": f3(0.9 * float(best["final_accuracy"])),
        "best_run": f"{NAMES[best['strategy']].split(' ')[0]}, seed {best['seed']}: "
                    f"{float(best['final_accuracy']):.3f}",
        "majority": f3(majority_default()),
    }


def generation(folder: Path) -> dict[str, str]:
    runs, rounds = by_run(read_csv(folder / "runs.csv")), read_csv(folder / "rounds.csv")
    centralised = (folder / "centralised-80steps.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in centralised]
    steps = [line for line in lines if "step" in line]

    def by_round(run: str) -> dict[int, dict]:
        return {int(row["round"]): row for row in rounds_of(rounds, run)}

    rows = []
    for run, words in (("default/fedsb-seed0", "`task=arithmetic strategy=fedsb clients=20`"),
                       ("default/fedavg-seed0",
                        "`task=arithmetic strategy=fedavg clients=20` (FedIT)")):
        done = by_round(run)
        rows.append([words, *[f"{float(done[r]['exact_match']):.2f}" for r in (0, 5, 10)],
                     f"{float(done[0]['eval_loss']):.2f} → {float(done[10]['eval_loss']):.2f}",
                     f"{float(runs[run]['wall_s']):.0f} s"])
    rows.append(["centralised LoRA, the same 80 sequential steps of 8 (rank 8 on q/v)",
                 *[f"{steps[i]['exact_match']:.2f}" + (f" (step {steps[i]['step']})" if i else "")
                   for i in range(3)],
                 f"{steps[0]['eval_loss']:.2f} → {steps[-1]['eval_loss']:.2f}",
                 f"{steps[-1]['wall_s']:.0f} s"])
    sft = by_round("sft-dates")
    return {
        "default": table(["", "round 0", "round 5", "round 10", "held-out loss", "wall time"],
                         rows),
        "sft": table(["round", "exact match (100 dates)", "held-out loss", "wall time so far"],
                     [[str(r), f"{float(row['exact_match']):.2f}", f"{float(row['eval_loss']):.2f}",
                       f"{float(row['wall_s']):.0f} s"] for r, row in sorted(sft.items())]),
        "methods": comparison_table(folder / "methods" / "comparison.csv"),
    }


def privacy(folder: Path) -> dict[str, str]:
    finals = sweep_finals(folder / "sweep.csv")
    runs = read_csv(folder / "runs.csv")
    epsilons = ("inf", "1024.0", "256.0", "64.0", "8.0", "3.0", "1.0")
    means = [[epsilon_words(eps)] + [f3(statistics.mean(finals[(m, eps)].values()))
                                     for m in DP_METHODS] for eps in epsilons]
    costs = []
    for method in DP_METHODS:
        mine = [run for run in runs if run["strategy"] == method]
        keys = ("bytes_up_total", "bytes_down_total", "one_time_bytes_up", "one_time_bytes_down")
        mean = [statistics.mean(float(run[key]) for run in mine) for key in keys]
        costs.append([NAMES[method], *[human_bytes(value) if value else "–" for value in mean]])
    sigma_64 = [float(run[key]) for run in runs if run["dp.epsilon"] == "64.0"
                for key in ("noise_multiplier_min", "noise_multiplier_max")]
    walls = [float(run["wall_s"]) for run in runs]
    return {
        "means": table(["ε", *[NAMES[m].split(" ")[0] for m in DP_METHODS]], means),
        "bytes": table(["method", "bytes up", "bytes down", "of which one-time up",
                        "one-time down"], costs),
        "sigma_64": f"{min(sigma_64):.2f}-{max(sigma_64):.2f}",
        "wall_range": f"{min(walls):.0f}-{max(walls):.0f} s",
        "majority": f3(majority_default()),
    }


def privacy_client(folder: Path) -> dict[str, str]:
    rows = read_csv(folder / "sweep.csv")
    runs = read_csv(folder / "runs.csv")
    epsilons = ("1.0", "3.0", "8.0", "inf")

    def values(eps: str, key: str) -> list[float]:
        return [float(row[key]) for row in rows if row["epsilon_target"] == eps and row[key]]

    spent = [f"{statistics.mean(values(eps, 'epsilon_spent')):.2f}" if values(eps, "epsilon_spent")
             else "–" for eps in epsilons]
    majority = majority_default()
    at_8 = statistics.mean(values("8.0", "final_accuracy"))
    no_dp = statistics.mean(values("inf", "final_accuracy"))
    sigma = {eps: {float(run["noise_multiplier_min"]) for run in runs if run["dp.epsilon"] == eps}
             for eps in ("3.0", "8.0")}
    return {
        "table": table(["FedSVD, 100 clients", *[epsilon_words(eps) for eps in epsilons]], [
            ["final accuracy, mean ± std of 2 seeds",
             *[mean_std(values(e, "final_accuracy")) for e in epsilons]],
            ["best accuracy over the rounds",
             *[mean_std(values(e, "best_accuracy")) for e in epsilons]],
            ["ε spent", *spent]]),
        "majority": f3(majority),
        "kept_8": f"{share(at_8, no_dp, majority):.0%} of its no-DP gain ({at_8 - majority:.3f} of "
                  f"{no_dp - majority:.3f})",
        "sigma_3": f"{sigma['3.0'].pop():.2f}", "sigma_8": f"{sigma['8.0'].pop():.2f}",
    }


def privacy_client_scale(folder: Path) -> dict[str, str]:
    runs = read_csv(folder / "runs.csv")
    sweep = read_csv(RESULTS / "privacy-client" / "sweep.csv")
    majority = majority_default()
    no_dp = statistics.mean(float(row["final_accuracy"]) for row in sweep
                            if row["epsilon_target"] == "inf")
    sweep_8 = next(r for r in sweep if r["epsilon_target"] == "8.0" and r["seed"] == "0")
    cells: dict[int, dict[str, str]] = {}
    std: dict[int, float] = {}
    for run in runs:
        found = re.fullmatch(r"runs/m(\d+)(_adaptive)?_seed0", run["run"])
        per_round, clipping = int(found[1]), "adaptive" if found[2] else "fixed"
        accuracy = float(run["final_accuracy"])
        std[per_round] = float(run["dp.noise_multiplier"]) / 10  # the mean of ~10 clipped updates
        cells.setdefault(per_round, {})[clipping] = \
            f"{accuracy:.3f}, {share(accuracy, no_dp, majority):.0%}"
    accuracy = float(sweep_8["final_accuracy"])
    cells[10]["fixed"] = \
        f"{accuracy:.3f}, {share(accuracy, no_dp, majority):.0%} (the sweep's seed 0)"
    order = sorted(cells)
    fixed = rounds_of(read_csv(folder / "rounds.csv"), "runs/m160_seed0")
    norms = [float(row["dp_median_norm"]) for row in fixed if row["dp_median_norm"]]
    return {
        "table": table(
            ["clients a round at ε = 8",
             *[f"{m}" + (" (this federation)" if m == 10 else "") for m in order]],
            [["noise std of the mean", *[f"{std[m]:.4f}" for m in order]],
             ["fixed C = 1", *[cells[m].get("fixed", "–") for m in order]],
             ["adaptive C (starts at 1, follows the median)",
              *[cells[m].get("adaptive", "–") for m in order]]]),
        "norm_first": f"{norms[0]:.1f}", "norm_last": f"{norms[-1]:.1f}",
        "no_dp": f3(no_dp), "majority": f3(majority),
    }


def privacy_record(folder: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "experiments"))
    import privacy_record_table as record

    majority = majority_language_id()
    sweep = record.final_accuracies([folder / "sweep.csv"])
    first_pass = RESULTS / "privacy-record-adamw"
    adamw = record.final_accuracies([first_pass / "sweep.csv",
                                     first_pass / "seed1-no-dp" / "sweep.csv"], only_epsilon="inf")
    main_rows, seed_rows = [], []
    for method in record.METHOD_ORDER:
        cells = [record.cell(sweep.get((method, eps), {})) for eps in record.EPSILONS]
        cells.append(record.cell(adamw.get((method, "inf"), {})))
        own, other = sweep.get((method, "inf")), adamw.get((method, "inf"))
        references = [statistics.mean(v.values()) for v in (own, other) if v]
        at_8 = sweep.get((method, "8.0"), {})
        for reference in (max(references), statistics.mean(own.values())):
            cells.append(record.kept_cell(at_8, reference, majority))
        main_rows.append([record.NAMES[method], *cells])
        by_seed = [sorted(sweep[(method, eps)].items()) for eps in record.EPSILONS]
        seed_rows.append([record.NAMES[method],
                          *[" / ".join(f3(value) for _, value in seeds) for seeds in by_seed]])
    walls: dict[bool, list[float]] = {True: [], False: []}
    spreads = []
    for row in read_csv(folder / "sweep.csv"):
        walls[row["epsilon_target"] != "inf"].append(float(row["wall_s"]))
    groups: dict[tuple, list[float]] = {}
    for row in read_csv(folder / "sweep.csv"):
        groups.setdefault((row["strategy"], row["epsilon_target"]), []).append(float(row["wall_s"]))
    group_means = {True: [], False: []}
    for (method, eps), values in groups.items():
        group_means[eps != "inf"].append(statistics.mean(values))
        if eps != "inf":
            spreads.append(statistics.stdev(values))
    init = {}
    for row in read_csv(folder / "rounds.csv"):
        if (row["run"].endswith("_fedsb") and row["round"] == "0" and "seed0" in row["run"]
                and row["epsilon"]):
            init[re.search(r"epsilon([\d.]+)_", row["run"])[1]] = float(row["epsilon"])

    # every knob tried at epsilon 8, seed 0
    def final(path: Path, run: str) -> float:
        return float(by_run(read_csv(path / "runs.csv"))[run]["final_accuracy"])

    adamw_8 = sweep_finals(RESULTS / "privacy-record-adamw" / "sweep.csv")
    tuning_runs = read_csv(RESULTS / "privacy-record-adamw-tuning" / "runs.csv")
    probes = RESULTS / "privacy-record-probes"
    partial = rounds_of(read_csv(probes / "rounds.csv"), "avg_full_lr3")[-1]
    grid = {(row["epsilon_target"], row["lr"], row["head_lr"]): float(row["final_accuracy"])
            for row in read_csv(RESULTS / "privacy-record-tuning" / "sweep.csv")}

    def tuning_cell(method: str) -> str:
        values = sorted({f3(float(run["final_accuracy"])) for run in tuning_runs
                         if run["strategy"] == method})
        count = sum(run["strategy"] == method for run in tuning_runs)
        return f"{' / '.join(values)} ({count} runs)"

    knobs = [
        ["AdamW, batch 32, the methods' default lr, C = 1 (first pass, `privacy-record-adamw`)",
         f3(adamw_8[("fedavg", "8.0")]["0"]), f3(adamw_8[("fedsb", "8.0")]["0"])],
        ["AdamW, lr 1e-3 or 3e-3 × C = 0.1 or 1 (`privacy-record-adamw-tuning`)",
         tuning_cell("fedavg"), tuning_cell("fedsb")],
        ["AdamW, batch 320 × 1 step a round; batch 128 × 5 steps × 3 rounds (probes)", "–",
         f"{f3(final(probes, 'sb_b320_s1'))}; {f3(final(probes, 'sb_b128_s5'))}"],
        ["SGD lr 0.5 for adapters and head alike, batch 32 (probe)", "–",
         f3(final(probes, "sb_sgd05_b32"))],
        ["SGD, full batches (q = 1), lr 3, 1 step a round (probe)",
         f"{f3(float(partial['accuracy']))} at round {partial['round']} (stopped: "
         f"{float(partial['wall_s']) / 60:.0f} min for {partial['round']} rounds)", "–"],
        ["SGD batch 64, adapters lr 0.1, `head_lr` 20 (probes)", f3(final(probes, "avg_h20_l01")),
         f3(final(probes, "sb_h20_l01"))],
        ["SGD batch 64, adapters lr 0.1, `head_lr` 5 / **10** / 30 (`privacy-record-tuning`)",
         " / ".join(f3(grid[("8.0", "0.1", h)]) for h in ("5", "10", "30")), "–"],
    ]
    return {
        "knobs": table(["setting at ε = 8, seed 0", "FedIT", "Fed-SB"], knobs),
        "main": table(["method", "ε = 1", "ε = 3", "ε = 8", "ε = 32", "no DP (this setting)",
                       "no DP (AdamW defaults)", "ε = 8 keeps (of the better no DP)",
                       "ε = 8 keeps (of this setting's no DP)"], main_rows),
        "seeds": table(["method (seed 0 / seed 1)", "ε = 1", "ε = 3", "ε = 8", "ε = 32",
                        "no DP"], seed_rows),
        "majority": f3(majority),
        "wall_dp": f"{min(group_means[True]):.0f}-{max(group_means[True]):.0f} s",
        "wall_no_dp": f"{min(group_means[False]):.0f}-{max(group_means[False]):.0f} s",
        "wall_spread": f"{max(spreads):.0f} s",
        "init_1": f"{init['1']:.2f}", "init_8": f"{init['8']:.1f}",
    }


def privacy_record_tuning(folder: Path) -> dict[str, str]:
    grid = read_csv(folder / "sweep.csv")
    head_lrs = sorted({row["head_lr"] for row in grid}, key=float)
    rows = []
    for eps in ("1.0", "3.0", "8.0"):
        for lr in ("0.01", "0.1"):
            cells = {row["head_lr"]: f3(float(row["final_accuracy"])) for row in grid
                     if row["epsilon_target"] == eps and row["lr"] == lr}
            if cells:
                rows.append([epsilon_words(eps), lr, *[cells.get(h, "–") for h in head_lrs]])
    return {"grid": table(["ε", "adapters' lr", *[f"`head_lr` {h}" for h in head_lrs]], rows),
            "runs": run_table(folder, ["dp.epsilon", "lr", "head_lr"])}


def privacy_record_adamw(folder: Path) -> dict[str, str]:
    finals = sweep_finals(folder / "sweep.csv")
    no_dp = sweep_finals(folder / "seed1-no-dp" / "sweep.csv")
    epsilons = ("1.0", "3.0", "8.0", "32.0", "inf")
    rows = [[NAMES[m], *[f3(finals[(m, e)]["0"]) for e in epsilons], f3(no_dp[(m, "inf")]["1"])]
            for m in DP_METHODS]
    return {"table": table(["method (seed 0)", *[epsilon_words(e) for e in epsilons],
                            "no DP, seed 1"], rows),
            "majority": f3(majority_language_id())}


def privacy_record_adamw_tuning(folder: Path) -> dict[str, str]:
    return {"runs": run_table(folder, ["lr", "dp.clip"])}


def privacy_record_probes(folder: Path) -> dict[str, str]:
    return {"runs": run_table(folder, ["rounds", "local_steps", "batch_size", "optimizer", "lr",
                                       "head_lr"])}


HETEROGENEOUS_CLAIMS = (  # (method, the paper's claim against zero-padded FedIT)
    ("flora", "FLoRA above zero-padded FedIT (FLoRA and FlexLoRA papers)"),
    ("flexlora", "FlexLoRA above zero-padded FedIT (FlexLoRA paper)"),
    ("hetlora", "HetLoRA's sparsity weights and pruning above plain zero-padding (HetLoRA paper)"),
)


def missing_heterogeneous_runs(done: set[tuple[str, str, str]], seeds=("0", "1")) -> str:
    """What of compare_heterogeneous.sh's whole grid (every method with a rank rule, both tasks,
    client_ranks and the two bounds, ``seeds``) has no finished run, setting by setting:
    ``done`` holds (setting, method, seed) of the finished runs."""
    from fedlora.strategies import STRATEGIES

    methods = sorted(name for name, cls in STRATEGIES.items() if cls.rank_rule is not None)
    parts = []
    for task in ("default", "arithmetic"):
        for kind in ("ranks", "r16", "r2"):
            setting = f"{task}-{kind}"
            gaps = {m: [s for s in seeds if (setting, m, s) not in done] for m in methods}
            gaps = {m: left for m, left in gaps.items() if left}
            if not gaps:
                continue
            if len(gaps) == len(methods) and all(len(left) == len(seeds) for left in gaps.values()):
                parts.append(f"`{setting}` (all of it)")
                continue
            words = [m if len(left) == len(seeds) else f"{m} (seed {', '.join(left)})"
                     for m, left in gaps.items()]
            parts.append(f"`{setting}`: " + ", ".join(words))
    return "; ".join(parts) if parts else "nothing: the grid is complete"


def heterogeneous(folder: Path) -> dict[str, str]:
    """experiments/compare_heterogeneous.sh: the table of comparison.csv
    (experiments/heterogeneous_table.py) and each paper's claim against the zero-padded FedIT
    runs of the same setting and seed, from runs.csv."""
    rows = read_csv(folder / "comparison.csv")
    tiers = ("2", "4", "8", "16")
    body = []
    for row in rows:
        scores = json.loads(row["tiers"])
        body.append([row["setting"], f"`{row['strategy']}`", row["seeds"].replace(" ", ", "),
                     f"{float(row['final_mean']):.3f} ± {float(row['final_std']):.3f}",
                     f"{float(row['final_min']):.3f}–{float(row['final_max']):.3f}",
                     f3(float(row["best_mean"])),
                     *[f3(scores[t]) if t in scores else "–" for t in tiers],
                     f"{float(row['bytes_up_mb']):.1f} / {float(row['bytes_down_mb']):.1f}"])
    runs = [run for run in read_csv(folder / "runs.csv") if run["finished"] == "1"]
    final = {(run["run"].split("/")[-2], run["strategy"], run["seed"]):
             float(run[f"final_{run['primary_metric']}"]) for run in runs}
    claims = []
    for setting in sorted({key[0] for key in final if key[0].endswith("-ranks")}):
        for method, claim in HETEROGENEOUS_CLAIMS:
            seeds = sorted(seed for s, m, seed in final if (s, m) == (setting, method)
                           and (setting, "fedavg", seed) in final)
            if not seeds:
                continue
            gaps = [final[(setting, method, s)] - final[(setting, "fedavg", s)] for s in seeds]
            verdict = "yes" if all(g > 0 for g in gaps) else "no" if all(g <= 0 for g in gaps) \
                else "mixed"
            claims.append([claim, setting, f"{statistics.mean(gaps):+.3f}",
                           ", ".join(f"{s}: {g:+.3f}" for s, g in zip(seeds, gaps)), verdict])
    return {
        "missing": missing_heterogeneous_runs(set(final)),
        "comparison": table(["setting", "method", "seeds", "final (mean ± std)", "final min–max",
                             "best", *[f"rank {t} tier" for t in tiers], "MB up / down"], body),
        "claims": table(["claim", "setting", "final gap (mean)", "per seed", "reproduces here?"],
                        claims),
        "majority": f3(majority_default()),
    }


PAGES = {"default": default, "methods": methods, "generation": generation, "privacy": privacy,
         "privacy-client": privacy_client, "privacy-client-scale": privacy_client_scale,
         "privacy-record": privacy_record, "privacy-record-tuning": privacy_record_tuning,
         "privacy-record-adamw": privacy_record_adamw,
         "privacy-record-adamw-tuning": privacy_record_adamw_tuning,
         "privacy-record-probes": privacy_record_probes, "heterogeneous": heterogeneous}
# Files an experiment's own script writes under a name FILE_WORDS describes otherwise.
FILE_WORDS_BY_EXPERIMENT = {
    "heterogeneous": {
        "comparison.csv": "`experiments/heterogeneous_table.py`'s table: one row per setting "
                          "and method, over its seeds (final and best score, each rank tier's "
                          "final score, bytes)",
        "comparison.md": "the same table in markdown"}}


# ---------------------------------------------------------------------------------------------
# the pages


def experiments() -> list[str]:
    return sorted(path.parent.name for path in RESULTS.glob("*/notes.md"))


def kept_files(folder: Path) -> list[Path]:
    """The files git keeps of an experiment: those at its top and in sub-folders that are not
    run folders (no results.jsonl), run lists or logs, that FILE_WORDS or a suffix describes."""
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        inside = [folder.joinpath(*parts[:i]) for i in range(1, len(parts))]
        if (path.is_file() and path.name != "notes.md"
                and (path.name in FILE_WORDS or path.suffix == ".png")
                and not any((d / "results.jsonl").exists() or d.name in ("runs", "logs")
                            for d in inside)):
            found.append(path)
    return found


def files_section(name: str) -> str:
    folder = RESULTS / name
    lines = ["## Files", "",
             f"In [experiments/results/{name}/](../../experiments/results/{name}/) (the run "
             "folders and logs are not kept in git: the command above writes them again):", ""]
    for path in kept_files(folder):
        relative = path.relative_to(folder).as_posix()
        words = FILE_WORDS_BY_EXPERIMENT.get(name, {}).get(path.name) or \
            FILE_WORDS.get(path.name, "plot")
        lines.append(f"- [{relative}](../../experiments/results/{name}/{relative}): {words}")
    return "\n".join(lines)


def render(name: str) -> str:
    folder = RESULTS / name
    notes = (folder / "notes.md").read_text(encoding="utf-8")
    computed = PAGES[name](folder) if name in PAGES else {}
    values = {"folder": f"../../experiments/results/{name}", **computed}

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise SystemExit(f"error: experiments/results/{name}/notes.md uses "
                             f"{{{{{match[1]}}}}}, which make_pages.py does not compute for "
                             f"'{name}' (PAGES)")
        return values[match[1]]

    header = (f"<!-- generated by `python experiments/make_pages.py` from "
              f"experiments/results/{name}/: edit notes.md and the CSV files there, not this "
              "page -->\n\n")
    return header + PLACEHOLDER.sub(fill, notes).rstrip("\n") + "\n\n" + files_section(name) + "\n"


def index() -> str:
    rows = []
    for name in experiments():
        notes = (RESULTS / name / "notes.md").read_text(encoding="utf-8")
        title = re.search(r"^# (.+)$", notes, re.MULTILINE)[1]
        folder = f"experiments/results/{name}/"
        rows.append(f"| [{title}]({name}.md) | [{folder}](../../{folder}) |")
    return "\n".join([
        "<!-- generated by `python experiments/make_pages.py`: edit "
        "experiments/results/*/notes.md, not this page -->", "",
        "# Measured results", "",
        "One page per experiment. Each experiment's folder under `experiments/results/` keeps",
        "what git holds of it: the command's summary tables (`runs.csv` and `rounds.csv`, every",
        "number of every run, written by `python -m fedlora.report.archive`; the `sweep.csv` or",
        "`comparison.csv` of the sweep or comparison), its plots, and `notes.md`, the page's",
        "text. The run folders and logs the command writes stay out of git (`.gitignore`):",
        "rerunning the command writes them again. The pages are generated from those files by",
        "`python experiments/make_pages.py`, and `tests/test_results_pages.py` fails when a page",
        "differs from what the files give. The files of a run directory are described in",
        "[../results.md](../results.md).", "",
        "Measurements are from the project's 2-vCPU CI-size machine unless a page says",
        "otherwise; wall times depend on what else ran on it, and final accuracies on its CPU's",
        "floating-point kernels (the [default job](default.md#the-same-run-on-different-machines)",
        "gives 0.6884 or 0.6935 depending on the machine).", "",
        "| page | its data |", "|---|---|", *rows, ""])


README = ROOT / "README.md"
README_START = ("<!-- default-job:start (generated by `python experiments/make_pages.py` from "
                "experiments/results/default/) -->\n")
README_END = "\n<!-- default-job:end -->"


def readme(text: str) -> str:
    """The README ``text`` with its default-job table regenerated."""
    if README_START not in text or README_END not in text:
        raise SystemExit("error: README.md lost its default-job markers; put back "
                         f"{README_START.strip()} ... {README_END.strip()} around the table")
    head, rest = text.split(README_START, 1)
    return head + README_START + default_job_table() + README_END + rest.split(README_END, 1)[1]


def pages() -> dict[str, str]:
    """{file name in docs/results/: text} for every experiment and the index."""
    return {"README.md": index(), **{f"{name}.md": render(name) for name in experiments()}}


def stale(docs: Path = DOCS) -> list[str]:
    """The pages of ``docs`` that differ from what the files give, or are missing or extra."""
    wanted = pages()
    present = {path.name for path in docs.glob("*.md")} if docs.is_dir() else set()
    differs = [name for name, text in wanted.items()
               if name not in present or (docs / name).read_text(encoding="utf-8") != text]
    current = README.read_text(encoding="utf-8")
    outdated = ["../../README.md"] if readme(current) != current else []
    return sorted(differs + sorted(present - set(wanted))) + outdated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a page is stale")
    parser.add_argument("--out", type=Path, default=DOCS,
                        help="where the pages go (default docs/results)")
    args = parser.parse_args()
    if args.check:
        names = stale(args.out)
        if names:
            print(f"error: stale in {args.out}: {', '.join(names)}; run "
                  "python experiments/make_pages.py", file=sys.stderr)
            raise SystemExit(1)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    written = pages()
    for name, text in written.items():
        (args.out / name).write_text(text, encoding="utf-8")
    README.write_text(readme(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {len(written)} pages to {args.out} and README.md's default-job table")


if __name__ == "__main__":
    main()
