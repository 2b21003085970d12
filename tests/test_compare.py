"""``python -m fedlora.report.compare`` on synthetic run directories with hand-computed numbers."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from fedlora.report.compare import compare, group_runs, load_run, main, run_dirs
from fedlora.core.errors import ConfigError


def make_run(path: Path, strategy: str, seed: int, accuracy: list[float], up: int, down: int,
             one_time_up: int = 0, one_time_down: int = 0, wall_s: float = 100.0,
             finished: bool = True, epsilon: list | None = None, **config) -> Path:
    """A run directory as fedlora.simulate writes it: round r (r >= 1) sends ``up``/``down``
    bytes; the one-time bytes are sent in round 1."""
    path.mkdir(parents=True)
    rows, up_cum, down_cum = [], 0, 0
    for round_, acc in enumerate(accuracy):
        if round_:
            up_cum += up + (one_time_up if round_ == 1 else 0)
            down_cum += down + (one_time_down if round_ == 1 else 0)
        rows.append({"round": round_, "strategy": strategy, "accuracy": acc, "loss": 1.0,
                     "train_loss": None, "clients_trained": 2, "clients_failed": 0,
                     "bytes_up": 0, "bytes_down": 0, "bytes_up_cum": up_cum, "bytes_down_cum": down_cum,
                     "params_up_per_client": 10, "epsilon": epsilon[round_] if epsilon else None,
                     "wall_s": 10.0 * (round_ + 1)})
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = {"strategy": strategy, "seed": seed, "rounds": len(accuracy) - 1, "rank": 8,
            "participation": {"name": "bernoulli", "mean_p": 0.3}, **config}
    (path / "config.yaml").write_text(yaml.safe_dump({**full, "out": str(path)}))
    if finished:
        (path / "summary.json").write_text(json.dumps({
            "final_accuracy": accuracy[-1], "bytes_up_total": up_cum, "bytes_down_total": down_cum,
            "one_time_bytes_up": one_time_up, "one_time_bytes_down": one_time_down,
            "wall_s": wall_s, "config": full}))
    return path


@pytest.fixture
def runs(tmp_path):
    """fedavg over 3 seeds, fedsb over 2 seeds (with one-time costs)."""
    multirun = tmp_path / "multirun"
    make_run(multirun / "0-fedavg-seed0", "fedavg", 0, [0.1, 0.4, 0.6], up=100, down=100, wall_s=90)
    make_run(multirun / "1-fedavg-seed1", "fedavg", 1, [0.1, 0.5, 0.7], up=100, down=100, wall_s=100)
    make_run(multirun / "2-fedavg-seed2", "fedavg", 2, [0.1, 0.3, 0.8], up=100, down=100, wall_s=110)
    make_run(multirun / "3-fedsb-seed0", "fedsb", 0, [0.2, 0.3, 0.4], up=10, down=10,
             one_time_up=1000, one_time_down=500, wall_s=60)
    make_run(multirun / "4-fedsb-seed1", "fedsb", 1, [0.2, 0.5, 0.4], up=10, down=10,
             one_time_up=1000, one_time_down=500, wall_s=80)
    return multirun


def read_csv(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def test_groups_seeds_with_exact_means_and_stds(runs, tmp_path):
    # Execute
    compare([runs], tmp_path / "out")
    table = read_csv(tmp_path / "out" / "comparison.csv")
    # Assert: one group per strategy, n = number of seeds
    assert list(table) == ["fedavg", "fedsb"]
    fedavg, fedsb = table["fedavg"], table["fedsb"]
    assert (fedavg["n"], fedavg["seeds"], fedsb["n"], fedsb["seeds"]) == ("3", "0 1 2", "2", "0 1")
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(0.7)
    assert float(fedavg["final_accuracy_std"]) == pytest.approx(0.1)  # sample std of .6 .7 .8
    assert float(fedsb["best_accuracy_mean"]) == pytest.approx(0.45)  # best of each: .4, .5
    assert float(fedsb["best_accuracy_std"]) == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert float(fedavg["bytes_up_mean"]) == 200 and float(fedsb["bytes_up_mean"]) == 1020
    assert float(fedsb["bytes_down_mean"]) == 520 and float(fedsb["one_time_bytes_up_mean"]) == 1000
    assert float(fedavg["wall_s_mean"]) == 100 and float(fedsb["wall_s_mean"]) == 70


def test_bytes_to_default_target(runs, tmp_path):
    # Default target: 0.9 * best final accuracy (0.8) = 0.72. fedavg seed 2 reaches it in round 2
    # (400 bytes up + down); seeds 0 and 1 never do. fedsb never does.
    rows = compare([runs], tmp_path / "out")
    assert rows[0]["target_accuracy"] == pytest.approx(0.72)
    assert (rows[0]["target_reached"], rows[0]["bytes_to_target_mean"]) == (1, 400)
    assert rows[1]["target_reached"] == 0 and rows[1]["bytes_to_target_mean"] is None
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md.splitlines()[0].endswith("| bytes to acc 0.720 | wall time |")
    fedavg_line, fedsb_line = md.splitlines()[2:4]
    assert "| 400 B (1/3 reached) |" in fedavg_line
    assert "| not reached |" in fedsb_line
    assert "| 0.700 ± 0.100 |" in fedavg_line
    assert "| 1.0 KB (1.0 KB one-time) | 520 B (500 B one-time) |" in fedsb_line


def test_bytes_to_explicit_target(runs, tmp_path):
    # Target 0.45: fedavg seeds reach it in rounds 2, 1, 2 (400, 200, 400 bytes);
    # fedsb seed 1 in round 1 (1010 + 510 bytes), seed 0 never.
    rows = compare([runs], tmp_path / "out", target=0.45)
    assert rows[0]["bytes_to_target_mean"] == pytest.approx(1000 / 3)
    assert rows[0]["bytes_to_target_std"] == pytest.approx(np.std([400, 200, 400], ddof=1))
    assert (rows[1]["target_reached"], rows[1]["bytes_to_target_mean"]) == (1, 1520)


def test_plots_are_written_and_not_blank(runs, tmp_path):
    compare([runs], tmp_path / "out")
    images = {}
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        path = tmp_path / "out" / name
        assert path.stat().st_size > 10_000, name
        images[name] = matplotlib.image.imread(path)
        # Lines and shading in several colours, not an empty canvas
        assert len(np.unique(images[name].reshape(-1, images[name].shape[-1]), axis=0)) > 50
    assert not np.array_equal(*images.values())


def withhold_bytes(run: Path) -> None:
    """Make ``run`` look like a client-level DP run: rows and summary without bytes."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.update({key: None for key in ("bytes_up", "bytes_down", "bytes_up_cum",
                                          "bytes_down_cum", "params_up_per_client")})
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(bytes_up_total=None, bytes_down_total=None, one_time_bytes_up=None,
                   one_time_bytes_down=None)
    (run / "summary.json").write_text(json.dumps(summary))


def test_runs_that_withheld_their_bytes_show_none_and_do_not_stop_the_comparison(runs, tmp_path):
    # Prepare: the fedsb runs withheld their bytes (client-level DP), the fedavg runs did not
    for run in ("3-fedsb-seed0", "4-fedsb-seed1"):
        withhold_bytes(runs / run)

    # Execute
    rows = compare([runs], tmp_path / "out", target=0.45)

    # Assert: fedsb has no bytes and no bytes to target, where 0 or "not reached" would mislead
    fedavg, fedsb = rows
    assert fedavg["bytes_up_mean"] == 200 and fedsb["bytes_up_mean"] is None
    assert fedsb["bytes_to_target_mean"] is None and fedsb["final_accuracy_mean"] == pytest.approx(0.4)
    fedsb_line = (tmp_path / "out" / "comparison.md").read_text().splitlines()[3]
    assert fedsb_line.startswith("| fedsb |") and "| – | – | – |" in fedsb_line
    assert (tmp_path / "out" / "accuracy_vs_bytes.png").stat().st_size > 10_000  # fedavg's lines


def test_partial_run_is_read_from_config_yaml(tmp_path):
    make_run(tmp_path / "a", "ffa", 0, [0.1, 0.3, 0.5], up=50, down=50)
    make_run(tmp_path / "b", "ffa", 1, [0.1, 0.2], up=50, down=50, finished=False, rounds=2)
    rows = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out", target=0.2)
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["finished"] == 1
    assert rows[0]["rounds_done"] == 1
    assert rows[0]["final_accuracy_mean"] == pytest.approx(0.35)
    assert rows[0]["wall_s_mean"] == pytest.approx((100 + 20) / 2)  # partial: last row's wall_s
    assert rows[0]["one_time_bytes_up_mean"] is None  # unknown until the summary exists
    assert "| 1 of 2 (1 partial) |" in (tmp_path / "out" / "comparison.md").read_text()


def test_same_label_different_config_are_told_apart(tmp_path):
    make_run(tmp_path / "r4", "fedavg", 0, [0.1, 0.5], up=1, down=1, rank=4)
    make_run(tmp_path / "r8", "fedavg", 0, [0.1, 0.6], up=1, down=1, rank=8)
    groups = group_runs([load_run(tmp_path / "r4"), load_run(tmp_path / "r8")])
    assert list(groups) == ["fedavg rank=4", "fedavg rank=8"]


def test_multirun_directory_expands_to_its_runs(runs):
    (runs / "5-ffa-seed0").mkdir()
    (runs / "5-ffa-seed0" / "results.jsonl").write_text("")  # just started: left out
    assert [p.name for p in run_dirs([runs])] == [f"{i}-{s}-seed{n}" for i, s, n in
                                                 [(0, "fedavg", 0), (1, "fedavg", 1), (2, "fedavg", 2),
                                                  (3, "fedsb", 0), (4, "fedsb", 1)]]


def test_epsilon_spent_is_last_non_null(tmp_path):
    run = load_run(make_run(tmp_path / "dp", "fedavg", 0, [0.1, 0.2, 0.3], up=1, down=1,
                            epsilon=[None, 1.5, None]))
    assert run.epsilon_spent == 1.5


def test_directory_without_results_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'empty'} has no results.jsonl; pass run directories written " \
                  "by python -m fedlora.simulate (its out=DIR)\n"
    with pytest.raises(ConfigError, match="has no rows yet"):
        (tmp_path / "empty" / "results.jsonl").write_text("")
        load_run(tmp_path / "empty")


def test_command_line(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedlora.report.compare", str(runs), "--out",
                           str(tmp_path / "out"), "--target", "0.45"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("| method | n | rounds | final accuracy")
    assert done.stdout == (tmp_path / "out" / "comparison.md").read_text().split("\n\n")[0] + "\n"
    bad = subprocess.run([sys.executable, "-m", "fedlora.report.compare", str(runs), "--target", "45"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == ("error: --target 45.0 is not an accuracy or exact match; give a number "
                          "in (0, 1]\n")
