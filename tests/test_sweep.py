"""``python -m fedlora.sweep``: the grid, validation, resuming, and the report on synthetic runs."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from fedlora.strategies import STRATEGIES

from fedlora import sweep
from tests.test_compare import make_run


def test_parse_splits_axes_fixed_keys_and_out():
    axes, fixed, out = sweep.parse(["strategy=fedavg,ffa", "dp.epsilon=1,3,inf", "rounds=3",
                                    "targets=[query,value]", "out=sweeps/a", "seed=0,1"])
    assert axes == {"strategy": ["fedavg", "ffa"], "dp.epsilon": ["1", "3", "inf"], "seed": ["0", "1"]}
    assert fixed == ["rounds=3", "targets=[query,value]"]
    assert out == Path("sweeps/a")


def test_plan_is_the_cartesian_product_first_axis_slowest():
    plan = sweep.combinations({"strategy": ["fedavg", "ffa"], "dp.epsilon": ["1", "inf"], "seed": ["0", "1", "2"]})
    assert len(plan) == 12
    assert [sweep.run_name(c) for c in plan[:4]] == ["fedavg_epsilon1_seed0", "fedavg_epsilon1_seed1",
                                                     "fedavg_epsilon1_seed2", "fedavg_epsiloninf_seed0"]
    assert sweep.run_name(plan[-1]) == "ffa_epsiloninf_seed2"
    assert sweep.run_name({}) == "run"
    assert sweep.overrides(plan[0], ["rounds=3"]) == ["rounds=3", "strategy=fedavg", "dp.epsilon=1", "seed=0"]


def test_keys_joined_by_a_colon_form_one_axis_whose_values_change_together():
    # Execute: epsilon and the head's lr tied (one lr per epsilon), crossed with two seeds
    axes, fixed, _ = sweep.parse(["dp.epsilon:head_lr=1:10,8:20", "seed=0,1", "rounds=3",
                                  "out=sweeps/t"])
    plan = sweep.combinations(axes)

    # Assert: 2 x 2 runs, not 2 x 2 x 2; each run carries both tied keys
    assert axes == {"dp.epsilon:head_lr": ["1:10", "8:20"], "seed": ["0", "1"]} and fixed == ["rounds=3"]
    assert plan == [{"dp.epsilon": "1", "head_lr": "10", "seed": "0"},
                    {"dp.epsilon": "1", "head_lr": "10", "seed": "1"},
                    {"dp.epsilon": "8", "head_lr": "20", "seed": "0"},
                    {"dp.epsilon": "8", "head_lr": "20", "seed": "1"}]
    assert [sweep.run_name(c) for c in plan[::2]] == ["epsilon1_head_lr10_seed0", "epsilon8_head_lr20_seed0"]
    assert sweep.overrides(plan[2], ["rounds=3"]) == ["rounds=3", "dp.epsilon=8", "head_lr=20", "seed=0"]
    assert sweep.tied_to_epsilon(axes) == {"head_lr"}
    assert sweep.tied_to_epsilon({"lr:head_lr": ["1:2"]}) == set()
    # a single tied value is still an axis (it names the run)
    assert sweep.parse(["dp.epsilon:head_lr=8:20", "out=o"])[0] == {"dp.epsilon:head_lr": ["8:20"]}


def test_a_key_in_two_axes_is_one_line_and_exit_2(capsys):
    # a seed axis and a seed tied to epsilon: the tied value would overwrite the axis' value
    with pytest.raises(SystemExit) as stop:
        sweep.parse(["seed=0,1", "seed:dp.epsilon=0:8,1:3", "out=o"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: 'seed' is in two axes (seed:dp.epsilon=... and another); "
                                       "give each key one axis\n")


def test_a_tied_axis_with_a_missing_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        sweep.parse(["dp.epsilon:head_lr=1:10,8", "out=o"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: '8' in dp.epsilon:head_lr=... has 1 value(s) for 2 keys; "
                                       "give one value per key, joined by ':' (e.g. "
                                       "dp.epsilon:head_lr=v:v)\n")


@pytest.mark.parametrize("argv, message", [
    (["strategy=fedavg,fedsbb", "seed=0,1"],
     f"error: strategy 'fedsbb' is unknown; choose one of: {', '.join(sorted(STRATEGIES))}\n"),
    (["strategy=fedavg,ffa", "rank=4,0"], "error: rank=0 must be a positive integer; set rank >= 1\n"),
    (["seed=0,1", "clients=2", "clients_per_round=3"],
     "error: clients_per_round=3 exceeds clients=2; set clients_per_round <= 2 or raise clients\n"),
    (["seed=0,1", "colour=red"],
     "error: 'colour' is not a fedlora setting; see fedlora/conf/config.yaml for the valid keys\n"),
])
def test_any_bad_combination_stops_the_sweep_before_it_runs(tmp_path, capsys, monkeypatch, argv, message):
    # Prepare: a launch that would record any run started
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda *args: launched.append(args) or 0)
    # Execute
    with pytest.raises(SystemExit) as stop:
        sweep.main([*argv, f"out={tmp_path / 'sweep'}"])
    # Assert: one line, exit 2, nothing run or written
    assert stop.value.code == 2
    assert capsys.readouterr().err == message
    assert launched == [] and not (tmp_path / "sweep").exists()


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as stop:
        sweep.main(["seed=0,1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: out=DIR is required")


def fake_launch(accuracy):
    """A stand-in for the simulate subprocess that writes a finished run directory."""
    calls = []

    def launch(keys, run_dir, log):
        calls.append(run_dir.name)
        strategy = next(k.split("=")[1] for k in keys if k.startswith("strategy="))
        seed = int(next(k.split("=")[1] for k in keys if k.startswith("seed=")))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.jsonl").unlink(missing_ok=True)
        make_run(run_dir / "tmp", strategy, seed, accuracy, up=10, down=10)
        for path in (run_dir / "tmp").iterdir():
            path.rename(run_dir / path.name)
        (run_dir / "tmp").rmdir()
        return 0

    return launch, calls


def test_resume_skips_finished_runs_and_moves_interrupted_ones_aside(tmp_path, monkeypatch, capsys):
    # Prepare: seed 0 finished; seed 1 interrupted twice before (one .failed-1 already there).
    # strategy=fedavg is fixed, not an axis, so it is not part of the run names.
    out = tmp_path / "sweep"
    make_run(out / "runs" / "seed0", "fedavg", 0, [0.1, 0.5], up=10, down=10)
    make_run(out / "runs" / "seed1", "fedavg", 1, [0.1, 0.2], up=10, down=10, finished=False)
    (out / "runs" / "seed1.failed-1").mkdir()
    launch, calls = fake_launch([0.1, 0.6])
    monkeypatch.setattr(sweep, "launch", launch)
    # Execute
    sweep.main(["strategy=fedavg", "seed=0,1,2", f"out={out}", "rounds=1"])
    # Assert
    assert calls == ["seed1", "seed2"]
    moved = out / "runs" / "seed1.failed-2"
    assert [json.loads(line)["accuracy"] for line in (moved / "results.jsonl").read_text().splitlines()] == [0.1, 0.2]
    assert (out / "runs" / "seed1" / "summary.json").is_file()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["sweep: 3 runs in " + str(out / "runs"),
                         "[1/3] seed0: finished before, skipped",
                         "[2/3] seed1 (interrupted run moved to seed1.failed-2) ... "
                         "final accuracy 0.6000 (best 0.6000), 0 s",
                         "[3/3] seed2 ... final accuracy 0.6000 (best 0.6000), 0 s"]
    with (out / "sweep.csv").open() as f:
        assert [row["final_accuracy"] for row in csv.DictReader(f)] == ["0.5", "0.6", "0.6"]


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    launch, calls = fake_launch([0.1, 0.6])
    monkeypatch.setattr(sweep, "launch", lambda keys, run_dir, log: 1 if run_dir.name == "seed0"
                        else launch(keys, run_dir, log))
    with pytest.raises(SystemExit) as stop:
        sweep.main(["strategy=fedavg", "seed=0,1", f"out={tmp_path}"])
    assert stop.value.code == 1 and calls == ["seed1"]
    captured = capsys.readouterr()
    assert f"[1/2] seed0 ... FAILED (exit 1); see {tmp_path / 'logs' / 'seed0.log'}" in captured.out
    assert captured.err == "error: 1 run(s) failed: seed0; run the same command again to retry them\n"


@pytest.fixture
def private_sweep(tmp_path):
    """fedavg and ffa at ε = 1, 8 and no DP, 2 seeds each, written as the sweep would."""
    plan = sweep.combinations({"strategy": ["fedavg", "ffa"], "dp.epsilon": ["1", "8", "inf"], "seed": ["0", "1"]})
    final = {("fedavg", "1"): (0.2, 0.4), ("fedavg", "8"): (0.5, 0.6), ("fedavg", "inf"): (0.7, 0.7),
             ("ffa", "1"): (0.3, 0.3), ("ffa", "8"): (0.4, 0.6), ("ffa", "inf"): (0.8, 0.6)}
    for c in plan:
        eps = None if c["dp.epsilon"] == "inf" else float(c["dp.epsilon"])
        make_run(tmp_path / "runs" / sweep.run_name(c), c["strategy"], int(c["seed"]),
                 [0.05, final[c["strategy"], c["dp.epsilon"]][int(c["seed"])]], up=100, down=200,
                 epsilon=[None, None if eps is None else eps * 0.9], wall_s=10 + int(c["seed"]))
    return tmp_path, plan


def test_report_rows_groups_and_plots(private_sweep):
    # Execute
    out, plan = private_sweep
    rows = sweep.write_report(out, plan, ["rounds=1"])
    # Assert: sweep.csv, one row per run
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert table[0] == {"strategy": "fedavg", "epsilon_target": "1.0", "seed": "0", "final_accuracy": "0.2",
                        "best_accuracy": "0.2", "epsilon_spent": "0.9", "bytes_up": "100",
                        "bytes_down": "200", "wall_s": "10", "run_dir": "runs/fedavg_epsilon1_seed0"}
    assert (table[4]["epsilon_target"], table[4]["epsilon_spent"]) == ("inf", "")
    # Groups: strategy x ε, means over the 2 seeds
    assert [r["label"] for r in rows] == ["fedavg ε=1", "fedavg ε=8", "fedavg no DP",
                                          "ffa ε=1", "ffa ε=8", "ffa no DP"]
    assert [round(r["final_accuracy_mean"], 6) for r in rows] == [0.3, 0.55, 0.7, 0.3, 0.5, 0.7]
    assert rows[0]["final_accuracy_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert rows[1]["epsilon_spent_mean"] == pytest.approx(7.2) and rows[2]["epsilon_spent_mean"] is None
    md = (out / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| method | n | rounds | final accuracy | best accuracy | ε spent |")
    assert md[2].startswith("| fedavg ε=1 | 2 | 1 | 0.300 ± 0.141 | 0.300 ± 0.141 | 0.90 |")
    assert md[4].startswith("| fedavg no DP | 2 | 1 | 0.700 | 0.700 | – |")
    # Plots: present, not blank, different
    images = [matplotlib.image.imread(out / name) for name in ("privacy_utility.png", "accuracy_vs_bytes.png")]
    for image in images:
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50
    assert images[0].shape != images[1].shape or not np.array_equal(*images)


def test_keys_tied_to_epsilon_label_the_groups_but_do_not_split_the_lines(tmp_path, monkeypatch):
    # Prepare: fedavg at two epsilons, a different head lr at each, 2 seeds
    axes = {"strategy": ["fedavg"], "dp.epsilon:head_lr": ["1:10", "8:20"], "seed": ["0", "1"]}
    plan = sweep.combinations(axes)
    for c in plan:
        make_run(tmp_path / "runs" / sweep.run_name(c), c["strategy"], int(c["seed"]), [0.1, 0.5],
                 up=1, down=1, epsilon=[None, float(c["dp.epsilon"])])
    drawn = {}
    monkeypatch.setattr(sweep.plots, "plot_privacy_utility",
                        lambda lines, path, metric: drawn.update(lines))

    # Execute
    rows = sweep.write_report(tmp_path, plan, [], sweep.tied_to_epsilon(axes))

    # Assert: one group per epsilon, named with its head lr; one line over both epsilons
    assert [r["label"] for r in rows] == ["fedavg head_lr=10 ε=1", "fedavg head_lr=20 ε=8"]
    assert drawn == {"fedavg": {1.0: [0.5, 0.5], 8.0: [0.5, 0.5]}}


def test_without_an_epsilon_axis_every_run_is_no_dp(tmp_path):
    plan = sweep.combinations({"strategy": ["fedavg", "ffa"], "seed": ["0", "1"]})
    for c in plan:
        make_run(tmp_path / "runs" / sweep.run_name(c), c["strategy"], int(c["seed"]), [0.1, 0.5], up=1, down=1)
    rows = sweep.write_report(tmp_path, plan, [])
    assert [r["label"] for r in rows] == ["fedavg no DP", "ffa no DP"]
    assert sweep.epsilon_target(plan[0], []) == math.inf
    assert sweep.epsilon_target(plan[0], ["dp.epsilon=3"]) == 3.0
    assert (tmp_path / "privacy_utility.png").stat().st_size > 10_000


@pytest.mark.slow  # three real simulations: ~1.5 min on 2 quiet cores, 6 min when shared
def test_real_sweep_of_two_tiny_runs_then_resume(tmp_path):
    # Execute: 2 real simulations (1 round, 2 clients, 2 steps of 16-token texts)
    argv = [sys.executable, "-m", "fedlora.sweep", "strategy=fedavg,ffa", "clients=2",
            "clients_per_round=2", "rounds=1", "local_steps=2", "max_length=16", f"out={tmp_path}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    # Assert
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[1/2] fedavg ... final accuracy" in done.stdout and "[2/2] ffa ... final accuracy" in done.stdout
    for name in ("fedavg", "ffa"):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "results.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_trained"] == 2
        assert "round   1/1" in (tmp_path / "logs" / f"{name}.log").read_text()
    with (tmp_path / "sweep.csv").open() as f:
        assert [(r["strategy"], r["epsilon_target"]) for r in csv.DictReader(f)] == [("fedavg", "inf"), ("ffa", "inf")]
    # Execute again after losing ffa's summary: fedavg is skipped, ffa moved aside and rerun
    (tmp_path / "runs" / "ffa" / "summary.json").unlink()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[1/2] fedavg: finished before, skipped" in again.stdout
    assert "[2/2] ffa (interrupted run moved to ffa.failed-1) ... final accuracy" in again.stdout
    assert (tmp_path / "runs" / "ffa.failed-1" / "results.jsonl").is_file()
    assert (tmp_path / "runs" / "ffa" / "summary.json").is_file()
