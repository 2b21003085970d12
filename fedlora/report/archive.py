"""``python -m fedlora.report.archive DIR... --out DIR``: every number of a set of runs in two
CSV files, so that their run directories can be left out of git (a rerun of the experiment's
command recreates them) without losing what the experiment's write-up states.

A DIR is a run directory, a directory of runs (a Hydra multirun), or a ``fedlora.sweep``
directory (its ``runs/<name>/``). Writes:

* ``OUT/runs.csv``: one row per run: ``run`` (its directory, relative to OUT), ``finished``,
  ``last_round``, the config keys whose values differ between the runs (``strategy`` and
  ``seed`` always), every number and string of ``summary.json``, and, for a run with DP, its
  noise multiplier(s) from ``privacy.json`` (record level: the smallest and largest of its
  clients'; client level: the server's);
* ``OUT/rounds.csv``: one row per evaluated round of every run: ``run`` and the fields of its
  ``results.jsonl`` row, plus, for client-level DP, that round's release from ``privacy.json``
  (the clipping bound, the median update norm, the clients sampled).

Interrupted runs a sweep moved aside (``<name>.failed-N``) are left out: their rerun replaced
them. A run that has not finished is kept (``finished`` 0, the summary's columns empty). Rows
already in OUT's CSV files for runs whose directory is gone are kept, so an experiment that
adds runs to a folder in several calls (or reruns one of them) loses none of the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from fedlora.core.errors import ConfigError
from flwr.common.config import flatten_dict

from fedlora.core.settings import run_config_values
from fedlora.report.compare import Run, load_run

ALWAYS_KEYS = ("strategy", "seed")
FAILED = re.compile(r"\.failed-\d+$")
# client-level DP releases, per round: privacy.json's name -> the rounds.csv column
RELEASE_FIELDS = {"clip": "dp_clip", "median_norm": "dp_median_norm", "clients": "dp_clients"}


def flat_config(config: dict) -> dict:
    """A run's nested config as ``{dotted.key: value}`` through Flower's flattener (null as an
    empty cell, as the csv module writes None; a list as its items joined by commas)."""
    return flatten_dict(run_config_values(config, null=""))


def find_runs(paths) -> list[Path]:
    """The run directories under ``paths`` (each: itself, its sub-directories, or its
    ``runs/`` sub-directories, whichever first holds a non-empty ``results.jsonl``)."""
    found = []
    for path in map(Path, paths):
        for pattern in ("results.jsonl", "*/results.jsonl", "runs/*/results.jsonl"):
            runs = sorted(p.parent for p in path.glob(pattern)
                          if p.stat().st_size and not FAILED.search(p.parent.name))
            if runs:
                found += runs
                break
        else:
            raise ConfigError(f"{path} holds no run (no results.jsonl in it, its sub-directories "
                              "or runs/); pass run, multirun or sweep directories")
    return found


def _name(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _cell(value):
    """A CSV cell: lists and dicts as JSON, None as empty."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def _privacy(path: Path) -> dict | None:
    file = path / "privacy.json"
    return json.loads(file.read_text()) if file.is_file() else None


def noise_columns(privacy: dict | None) -> dict:
    """The run's DP mode and the noise multiplier(s) it used, from ``privacy.json``."""
    if privacy is None:
        return {}
    if privacy.get("mode") == "client":
        sigmas = [privacy["noise_multiplier"]]
    else:
        sigmas = [client["noise_multiplier"] for client in privacy.get("clients", {}).values()]
    return {"dp_mode": privacy.get("mode", "record"),
            "noise_multiplier_min": min(sigmas) if sigmas else None,
            "noise_multiplier_max": max(sigmas) if sigmas else None}


def run_row(run: Run, name: str, keys: list[str]) -> dict:
    config = flat_config(run.config)
    row = {"run": name, "finished": int(run.finished), "last_round": run.rows[-1]["round"]}
    row.update({key: _cell(config.get(key)) for key in keys})
    for key, value in (run.summary or {}).items():
        if not isinstance(value, (dict, list)):
            row[key] = _cell(value)
    row.update({k: _cell(v) for k, v in noise_columns(_privacy(run.path)).items()})
    return row


def round_rows(run: Run, name: str) -> list[dict]:
    privacy = _privacy(run.path)
    releases = {}
    if privacy and privacy.get("mode") == "client":
        releases = {release["round"]: release for release in privacy.get("releases", [])}
    rows = []
    for result in run.rows:
        row = {"run": name, **{k: _cell(v) for k, v in result.items() if k != "strategy"}}
        if releases:
            release = releases.get(result["round"], {})
            row.update({column: _cell(release.get(field))
                        for field, column in RELEASE_FIELDS.items()})
        rows.append(row)
    return rows


def differing_keys(runs: list[Run]) -> list[str]:
    """``strategy``, ``seed`` and every other config key whose value is not the same in all
    runs, in the first run's order (``out`` is where a run was written, not what it ran)."""
    configs = [flat_config(run.config) for run in runs]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    varying = [key for key in keys if key != "out" and key not in ALWAYS_KEYS and
               len({json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}) > 1]
    return list(ALWAYS_KEYS) + varying


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def merged(earlier: list[dict], rows: list[dict], out: Path) -> list[dict]:
    """``rows`` and the ``earlier`` rows whose run directory no longer exists (their numbers
    are all that is left of them), in the order of the run names."""
    fresh = {row["run"] for row in rows}
    kept = [row for row in earlier if row["run"] not in fresh and not (out / row["run"]).exists()]
    return sorted(kept + rows, key=lambda row: row["run"])


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV; the columns are the union of their keys, in first-seen order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def archive(paths, out) -> tuple[Path, Path]:
    """Write ``runs.csv`` and ``rounds.csv`` for the runs under ``paths`` into ``out``."""
    out = Path(out)
    runs = [load_run(path) for path in find_runs(paths)]
    names = [_name(run.path, out) for run in runs]
    keys = differing_keys(runs)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"runs.csv": [run_row(run, name, keys) for run, name in zip(runs, names)],
              "rounds.csv": [row for run, name in zip(runs, names) for row in round_rows(run, name)]}
    for file, rows in tables.items():
        write_rows(out / file, merged(read_rows(out / file), rows, out))
    return out / "runs.csv", out / "rounds.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.report.archive",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run directories, directories of runs, or sweep directories")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where runs.csv and rounds.csv go (run names are relative to it)")
    args = parser.parse_args(argv)
    try:
        written = archive(args.dirs, args.out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print("wrote " + " and ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
