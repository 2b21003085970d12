"""``python -m fedlora.sweep key=v1,v2,... [key=value ...] out=DIR``: a resumable grid of runs.

Every ``key=v1,v2,...`` is an axis; the sweep runs the cartesian product of the axes (the first
axis varies slowest), each combination as its own ``python -m fedlora.simulate <keys>
out=DIR/runs/<name>`` subprocess, one after the other, with one status line per run. Other
``key=value`` arguments are passed to every run unchanged. Example (issue 5's privacy sweep;
``dp.epsilon`` needs the DP feature)::

    python -m fedlora.sweep strategy=fedavg,ffa,fedsb,fedsvd dp.epsilon=1,3,8,inf seed=0,1,2 \\
        out=sweeps/privacy clients=30 rounds=10

* Keys joined by ``:`` form one axis whose values change together (``a:b=1:x,2:y`` runs a=1
  with b=x, then a=2 with b=y): a setting tuned per ε, e.g. ``dp.epsilon:head_lr=1:10,8:20``.
  Such keys name the run like any axis, and keys tied to ``dp.epsilon`` do not split the
  privacy-utility plot's lines.
* Every combination is validated (Hydra composes it against the structured config of every
  key, then ``RunConfig.from_dict``) before the first run starts; a bad one is one line on
  stderr and exit code 2.
* Resumable: run it again with the same arguments. A run whose ``summary.json`` exists is
  skipped; a run directory without one (an interrupted run) is moved aside to
  ``<name>.failed-N`` (never deleted) and the run starts again from scratch.
* Each run's console output goes to ``DIR/logs/<name>.log``.
* Then ``DIR/sweep.csv`` (one row per finished run), ``DIR/sweep.md`` (mean ± std over seeds per
  strategy × ε), ``DIR/privacy_utility.png`` (final primary metric, accuracy or exact match,
  against ε, one line per strategy; ε = inf is the "no DP" point on the right) and
  ``DIR/<metric>_vs_bytes.png``. The ε axis is
  the ``dp.epsilon`` axis; without one every run is a single "no DP" point.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from fedlora.report import plots
from fedlora.report.compare import Run, common_metric, load_run, markdown_table, summarise
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.run.cli import compose_config, fail

EPSILON_KEY = "dp.epsilon"
NO_DP = ("inf", "+inf", "infinity", "null", "none", "")


def parse(argv: list[str]) -> tuple[dict[str, list[str]], list[str], Path]:
    """Split the command line into axes ``{key: [values]}``, fixed ``key=value`` overrides and
    the sweep's directory. A value in brackets or quotes (``targets=[query,value]``) is one
    value, not an axis."""
    axes: dict[str, list[str]] = {}
    fixed, out = [], None
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            fail(f"'{arg}' is not key=value; write axes as key=v1,v2 and fixed settings as key=value")
        key, value = arg.split("=", 1)
        if key == "out":
            out = Path(value)
        elif ":" in key or ("," in value and value[0] not in "[{('\""):
            if key in axes:
                fail(f"axis '{key}' is given twice; list all its values once: {key}=v1,v2")
            shared = next((k for axis in axes for k in axis.split(":") if k in key.split(":")), None)
            if shared:  # else one axis would silently overwrite the other's value
                fail(f"'{shared}' is in two axes ({key}=... and another); give each key one axis")
            axes[key] = value.split(",")
            width = len(key.split(":"))
            for tied in axes[key]:
                if len(tied.split(":")) != width:
                    fail(f"'{tied}' in {key}=... has {len(tied.split(':'))} value(s) for {width} "
                         f"keys; give one value per key, joined by ':' (e.g. "
                         f"{key}={':'.join(['v'] * width)})")
        else:
            fixed.append(arg)
    if out is None:
        fail("out=DIR is required: the sweep's directory (run again with the same out=DIR to resume)")
    return axes, fixed, out


def combinations(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the axes, each a ``{key: value}`` dict (a ``k1:k2`` axis gives
    both keys their tied values)."""
    return [{key: value for keys, values in zip(axes, picked)
             for key, value in zip(keys.split(":"), values.split(":"))}
            for picked in itertools.product(*axes.values())]


def tied_to_epsilon(axes: dict[str, list[str]]) -> set[str]:
    """The keys that change together with ``dp.epsilon`` (``dp.epsilon:lr=...``)."""
    return {key for keys in axes if EPSILON_KEY in keys.split(":")
            for key in keys.split(":") if key != EPSILON_KEY}


def run_name(combination: dict[str, str]) -> str:
    """``{"strategy": "fedavg", "dp.epsilon": "1", "seed": "0"}`` -> ``fedavg_epsilon1_seed0``."""
    parts = [value if key == "strategy" else key.rsplit(".", 1)[-1] + value
             for key, value in combination.items()]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)) if parts else "run"


def overrides(combination: dict[str, str], fixed: list[str]) -> list[str]:
    return fixed + [f"{key}={value}" for key, value in combination.items()]


def validate(plan: list[dict[str, str]], fixed: list[str]) -> None:
    """Check every combination as ``python -m fedlora.simulate`` would, before any run starts."""
    for combination in plan:
        try:
            RunConfig.from_dict(compose_config(overrides(combination, fixed)))
        except ConfigError as error:
            fail(str(error))


def move_aside(run_dir: Path) -> Path:
    """Rename an interrupted run's directory to the first free ``<name>.failed-N``."""
    for n in itertools.count(1):
        target = run_dir.with_name(f"{run_dir.name}.failed-{n}")
        if not target.exists():
            run_dir.rename(target)
            return target


def launch(keys: list[str], run_dir: Path, log: Path) -> int:
    """One ``python -m fedlora.simulate`` run; its console output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as console:
        return subprocess.run([sys.executable, "-m", "fedlora.simulate", *keys, f"out={run_dir}"],
                              stdout=console, stderr=subprocess.STDOUT).returncode


def execute(plan: list[dict[str, str]], fixed: list[str], out: Path) -> list[str]:
    """Run the combinations not finished yet, one after the other; return the failed names."""
    failed = []
    for number, combination in enumerate(plan, 1):
        name = run_name(combination)
        run_dir = out / "runs" / name
        status = f"[{number}/{len(plan)}] {name}"
        if (run_dir / "summary.json").is_file():
            print(f"{status}: finished before, skipped", flush=True)
            continue
        if run_dir.exists():
            status += f" (interrupted run moved to {move_aside(run_dir).name})"
        print(f"{status} ...", end="", flush=True)
        started = time.time()
        code = launch(overrides(combination, fixed), run_dir, out / "logs" / f"{name}.log")
        if code == 0 and (run_dir / "summary.json").is_file():
            run = load_run(run_dir)
            print(f" final {run.metric.replace('_', ' ')} {run.final_score:.4f} (best "
                  f"{run.best_score:.4f}), "
                  f"{time.time() - started:.0f} s", flush=True)
        else:
            failed.append(name)
            print(f" FAILED (exit {code}); see {out / 'logs' / f'{name}.log'}", flush=True)
    return failed


def epsilon_target(combination: dict[str, str], fixed: list[str]) -> float:
    """The run's ε from the command line (axis, then fixed key); inf when it has none (no DP)."""
    value = combination.get(EPSILON_KEY)
    for arg in fixed:
        if value is None and arg.startswith(EPSILON_KEY + "="):
            value = arg.split("=", 1)[1]
    return math.inf if value is None or value.strip().lower() in NO_DP else float(value)


def _epsilon_label(epsilon: float) -> str:
    return "no DP" if math.isinf(epsilon) else f"ε={epsilon:g}"


CSV_FIELDS = ("strategy", "epsilon_target", "seed", "final_{metric}", "best_{metric}",
              "epsilon_spent", "bytes_up", "bytes_down", "wall_s", "run_dir")


def write_report(out: Path, plan: list[dict[str, str]], fixed: list[str],
                 tied: set[str] = frozenset()) -> list[dict]:
    """``sweep.csv``, ``sweep.md``, ``privacy_utility.png`` and ``accuracy_vs_bytes.png`` from
    the finished runs of ``plan``; returns the table's group rows. ``tied``: keys that change
    with ε (they label the table's groups but do not split the plot's lines)."""
    finished: list[tuple[dict, float, Run]] = [
        (combination, epsilon_target(combination, fixed), load_run(out / "runs" / run_name(combination)))
        for combination in plan if (out / "runs" / run_name(combination) / "summary.json").is_file()]
    if not finished:
        return []
    other_axes = [key for key in plan[0] if key not in ("strategy", EPSILON_KEY, "seed")]
    metric = common_metric([run for _, _, run in finished])
    fields = [name.format(metric=metric) for name in CSV_FIELDS]
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields[:3], *other_axes, *fields[3:]])
        writer.writeheader()
        for combination, epsilon, run in finished:
            writer.writerow({"strategy": run.config["strategy"], "epsilon_target": epsilon,
                             "seed": run.config["seed"], **{k: combination[k] for k in other_axes},
                             f"final_{metric}": run.final_score, f"best_{metric}": run.best_score,
                             "epsilon_spent": run.epsilon_spent, "bytes_up": run.bytes_up,
                             "bytes_down": run.bytes_down, "wall_s": run.wall_s,
                             "run_dir": run.path.relative_to(out)})

    # Seeds of one strategy x ε (x any other axis) form a group; a line is a group minus ε.
    groups: dict[str, list[Run]] = {}
    lines: dict[str, dict[float, list[float]]] = {}
    for combination, epsilon, run in finished:
        line = " ".join([run.config["strategy"],
                         *(f"{k}={combination[k]}" for k in other_axes if k not in tied)])
        label = " ".join([line, *(f"{k}={combination[k]}" for k in other_axes if k in tied)])
        groups.setdefault(f"{label} {_epsilon_label(epsilon)}", []).append(run)
        lines.setdefault(line, {}).setdefault(epsilon, []).append(run.final_score)
    runs = [run for _, _, run in finished]
    target = 0.9 * max(run.final_score for run in runs)
    rows = [summarise(label, members, target, metric) for label, members in groups.items()]
    (out / "sweep.md").write_text(
        markdown_table(rows, metric) + f"\nMean ± standard deviation over the n seeds of each "
        f"group; bytes to target count up + down until a run first reaches {target:.3f} (90 % of "
        f"the best final {metric.replace('_', ' ')}).\n")
    plots.plot_privacy_utility(lines, out / "privacy_utility.png", metric=metric)
    plots.plot_accuracy_vs_bytes({label: [run.rows for run in members] for label, members in groups.items()},
                                 out / f"{metric}_vs_bytes.png", metric=metric)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    axes, fixed, out = parse(argv)
    plan = combinations(axes)
    validate(plan, fixed)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(plan)} runs in {out / 'runs'}", flush=True)
    failed = execute(plan, fixed, out)
    rows = write_report(out, plan, fixed, tied_to_epsilon(axes))
    if rows:
        print(markdown_table(rows), end="")
        print(f"wrote {out / 'sweep.csv'}, sweep.md, privacy_utility.png and the "
              "<metric>_vs_bytes.png plot")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; run the same command "
              "again to retry them", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
