"""``python -m fedlora.report.archive``: runs.csv and rounds.csv keep the numbers of run
directories written here by hand (the oracle is the files themselves)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from fedlora.report.archive import archive


def write_run(path: Path, config: dict, rows: list[dict], summary: dict | None = None,
              privacy: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(path)}))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps({**summary, "config": config,
                                                       "client_processes": {"17": 1}}))
    if privacy is not None:
        (path / "privacy.json").write_text(json.dumps(privacy))
    return path


def row(round_: int, accuracy: float, epsilon=None) -> dict:
    return {"round": round_, "strategy": "fedavg", "accuracy": accuracy, "bytes_up_cum": 10 * round_,
            "epsilon": epsilon, "wall_s": 1.5 * round_}


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_sweep_becomes_one_row_per_run_and_per_round(tmp_path):
    # Prepare: a sweep with a finished record-level DP run (two clients' sigmas), an unfinished
    # run, and an interrupted run the sweep moved aside (its rerun is "a")
    sweep = tmp_path / "sweep"
    base = {"strategy": "fedavg", "seed": 0, "lr": 0.1, "dp": {"epsilon": 8.0}}
    write_run(sweep / "runs" / "a", base, [row(0, 0.1, 0.0), row(2, 0.6, 7.9)],
              summary={"final_accuracy": 0.6, "one_time_bytes_up": 0, "wall_s": 30.0,
                       "noise": "reproducible", "resumed_after_rounds": []},
              privacy={"mode": "record", "clients": {"0": {"noise_multiplier": 0.9},
                                                     "1": {"noise_multiplier": 0.7}}})
    write_run(sweep / "runs" / "b", {**base, "seed": 1, "dp": {"epsilon": None}}, [row(0, 0.2)])
    write_run(sweep / "runs" / "a.failed-1", base, [row(0, 0.99)])

    # Execute
    archive([sweep], sweep)
    runs, rounds = read(sweep / "runs.csv"), read(sweep / "rounds.csv")

    # Assert: lr is the same in both runs, so it is not a column; seed always is
    assert list(runs[0]) == ["run", "finished", "last_round", "strategy", "seed", "dp.epsilon",
                             "final_accuracy", "one_time_bytes_up", "wall_s", "noise", "dp_mode",
                             "noise_multiplier_min", "noise_multiplier_max"]
    assert runs[0] == {"run": "runs/a", "finished": "1", "last_round": "2", "strategy": "fedavg",
                       "seed": "0", "dp.epsilon": "8.0", "final_accuracy": "0.6",
                       "one_time_bytes_up": "0", "wall_s": "30.0", "noise": "reproducible",
                       "dp_mode": "record", "noise_multiplier_min": "0.7",
                       "noise_multiplier_max": "0.9"}
    assert (runs[1]["run"], runs[1]["finished"], runs[1]["seed"], runs[1]["dp.epsilon"],
            runs[1]["final_accuracy"]) == ("runs/b", "0", "1", "", "")
    assert len(runs) == 2
    assert [(r["run"], r["round"], r["accuracy"], r["bytes_up_cum"], r["epsilon"]) for r in rounds] == [
        ("runs/a", "0", "0.1", "0", "0.0"), ("runs/a", "2", "0.6", "20", "7.9"),
        ("runs/b", "0", "0.2", "0", "")]


def test_client_level_releases_join_their_rounds(tmp_path):
    # Prepare: one client-level run; round 1's release clipped at 1.0, round 2's at 1.1
    releases = [{"kind": "train", "round": 1, "clip": 1.0, "clients": 11, "median_norm": 9.7},
                {"kind": "train", "round": 2, "clip": 1.1, "clients": 9, "median_norm": 9.3}]
    run = write_run(tmp_path / "run", {"strategy": "fedsvd", "seed": 0},
                    [row(0, 0.03, 0.0), row(1, 0.08, 0.3), row(2, 0.1, 0.5)],
                    summary={"final_accuracy": 0.1},
                    privacy={"mode": "client", "noise_multiplier": 2.5, "releases": releases})

    # Execute
    archive([run], tmp_path / "out")
    runs, rounds = read(tmp_path / "out" / "runs.csv"), read(tmp_path / "out" / "rounds.csv")

    # Assert: round 0 has no release
    assert (runs[0]["dp_mode"], runs[0]["noise_multiplier_min"]) == ("client", "2.5")
    assert [(r["round"], r["dp_clip"], r["dp_median_norm"], r["dp_clients"]) for r in rounds] == [
        ("0", "", "", ""), ("1", "1.0", "9.7", "11"), ("2", "1.1", "9.3", "9")]


def test_a_folder_without_runs_is_one_line_and_exit_code_2(tmp_path):
    # Execute
    done = subprocess.run([sys.executable, "-m", "fedlora.report.archive", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)

    # Assert
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds no run (no results.jsonl in it, its sub-directories or runs/); "
        "pass run, multirun or sweep directories"]


def test_rows_of_runs_whose_folder_is_gone_are_kept(tmp_path):
    # Prepare: runs a and b archived, then a's folder deleted (as after a fresh clone), b rerun
    # with a new result and c added
    sweep = tmp_path / "sweep"
    for name, accuracy in (("a", 0.5), ("b", 0.6)):
        write_run(sweep / "runs" / name, {"strategy": "ffa", "seed": 0}, [row(0, accuracy)],
                  summary={"final_accuracy": accuracy})
    archive([sweep], sweep)
    for name in ("a", "b"):
        for file in (sweep / "runs" / name).iterdir():
            file.unlink()
        (sweep / "runs" / name).rmdir()
    write_run(sweep / "runs" / "b", {"strategy": "ffa", "seed": 0}, [row(0, 0.7)],
              summary={"final_accuracy": 0.7})
    write_run(sweep / "runs" / "c", {"strategy": "ffa", "seed": 1}, [row(0, 0.8)],
              summary={"final_accuracy": 0.8})

    # Execute
    archive([sweep], sweep)

    # Assert: a's numbers survive, b's are the rerun's
    assert [(r["run"], r["final_accuracy"]) for r in read(sweep / "runs.csv")] == [
        ("runs/a", "0.5"), ("runs/b", "0.7"), ("runs/c", "0.8")]
    assert [(r["run"], r["accuracy"]) for r in read(sweep / "rounds.csv")] == [
        ("runs/a", "0.5"), ("runs/b", "0.7"), ("runs/c", "0.8")]
