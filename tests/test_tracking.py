"""``tracking=tensorboard|wandb|mlflow``: what each tracker logs, read back with the library's own
reader (TensorBoard's event accumulator, the one its server uses; W&B's ``wandb leet inspect`` of
the offline run file; ``mlflow.get_run`` and the metric history), and the config check.

The rows are results rows as ``fedlora.run.server`` writes them; the expected values are the
rows themselves, so a tracker that rounds, drops or shifts a value fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.report import tracking
from fedlora.report.tracking import flat_params, numbers, open_tracker

ROWS = [  # round 0 has no training loss; epsilon is null without DP
    {"round": 0, "strategy": "fedavg", "accuracy": 0.03272727272727273, "loss": 3.046612739562988,
     "train_loss": None, "clients_trained": 0, "clients_failed": 0, "bytes_up": 0, "bytes_down": 0,
     "bytes_up_cum": 0, "bytes_down_cum": 0, "params_up_per_client": 0, "epsilon": None,
     "wall_s": 38.113},
    {"round": 1, "strategy": "fedavg", "accuracy": 0.2687878787878788, "loss": 2.846213340759277,
     "train_loss": 2.9712345123291016, "clients_trained": 2, "clients_failed": 0,
     "bytes_up": 654532, "bytes_down": 654532, "bytes_up_cum": 654532, "bytes_down_cum": 654532,
     "params_up_per_client": 81765, "epsilon": None, "wall_s": 40.5},
    {"round": 2, "strategy": "fedavg", "accuracy": 0.24621212121212122, "loss": 2.668701171875,
     "train_loss": 2.7, "clients_trained": 2, "clients_failed": 1, "bytes_up": 1309064123,
     "bytes_down": 654532, "bytes_up_cum": 1309718655, "bytes_down_cum": 1309064,
     "params_up_per_client": 81765, "epsilon": 1.2345678901234567, "wall_s": 43.25},
]
LRS = {1: 0.01, 2: 0.001}
CONFIG = {"strategy": "fedavg", "rank": 8, "lr": 0.01, "targets": ["query", "value"],
          "dp": {"epsilon": None, "delta": 1e-05}, "verbose": False, "out": "runs/x"}


def logged(row: dict) -> dict[str, float]:
    """What the server hands a tracker for ``row`` (``fedlora.run.server``'s ``add_row``)."""
    return {**numbers(row), **({"lr": LRS[row["round"]]} if row["round"] else {})}


def log_run(kind: str, out: Path, rows=ROWS, resumed_after: int | None = None) -> None:
    tracker = open_tracker(kind, out, resumed_after)
    tracker.log_params(flat_params(CONFIG))
    for row in rows:
        tracker.log_metrics(row["round"], logged(row))
    tracker.close()


def expected_series(rows=ROWS) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in logged(row).items():
            series.setdefault(key, []).append((row["round"], value))
    return series


def test_numbers_are_the_rows_numeric_fields_but_the_round():
    assert numbers(ROWS[0]) == {"accuracy": ROWS[0]["accuracy"], "loss": ROWS[0]["loss"],
                                "clients_trained": 0.0, "clients_failed": 0.0, "bytes_up": 0.0,
                                "bytes_down": 0.0, "bytes_up_cum": 0.0, "bytes_down_cum": 0.0,
                                "params_up_per_client": 0.0, "wall_s": 38.113}
    assert numbers({"round": 3, "redone": True, "epsilon": float("inf")}) == {}
    assert flat_params(CONFIG) == {"strategy": "fedavg", "rank": 8, "lr": 0.01,
                                   "targets": "query,value", "dp.epsilon": "null",
                                   "dp.delta": 1e-05, "verbose": False, "out": "runs/x"}


# -- TensorBoard ---------------------------------------------------------------------------------


def tensorboard_series(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """Every scalar series and the hyper-parameters, as TensorBoard's server reads them."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(logdir))
    events.Reload()
    series = {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                    for e in events.Tensors(tag)]
              for tag in events.Tags()["tensors"] if not tag.startswith("_hparams_")}
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = getattr(value, value.WhichOneof("kind"))
    return series, hparams


def test_tensorboard_logs_every_row_exactly_and_the_config(tmp_path):
    # Execute
    log_run("tensorboard", tmp_path)

    # Assert: double precision: every value equals the row's (a float32 scalar would not)
    series, hparams = tensorboard_series(tmp_path / "tensorboard")
    assert series == expected_series()
    assert hparams == {"strategy": "fedavg", "rank": 8.0, "lr": 0.01, "targets": "query,value",
                       "dp.epsilon": "null", "dp.delta": 1e-05, "verbose": False,
                       "out": "runs/x"}


def test_tensorboard_resume_replaces_the_rounds_after_the_checkpoint(tmp_path):
    # Prepare: a run that logged rounds 0-2, then was killed with its checkpoint after round 1
    log_run("tensorboard", tmp_path)
    redone = [ROWS[0], ROWS[1], {**ROWS[2], "accuracy": 0.5}]

    # Execute: the resumed run logs round 2 again (not bit-exact here, on purpose)
    log_run("tensorboard", tmp_path, rows=redone[2:], resumed_after=1)

    # Assert: round 2 once, the resumed run's
    series, _ = tensorboard_series(tmp_path / "tensorboard")
    assert series == expected_series(redone)


# -- W&B -----------------------------------------------------------------------------------------


def wandb_records(out: Path) -> list[dict]:
    """The records of every offline run under ``out/wandb``, read by W&B's own inspector."""
    records = []
    for run_file in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                               str(run_file)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        records += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return records


def wandb_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_") and key != "round":
                    series.setdefault(key, []).append((item["round"], value))
    return series


def test_wandb_logs_every_row_offline_against_the_round(tmp_path, monkeypatch):
    # Prepare: no W&B settings of the user's
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    # Execute
    log_run("wandb", tmp_path)

    # Assert: an offline run in DIR/wandb, its config and every row's values
    records = wandb_records(tmp_path)
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert len(runs) == 1 and runs[0]["project"] == "fedlora"
    assert runs[0]["display_name"] == tmp_path.name
    assert runs[0]["run_id"] == json.loads((tmp_path / "tracking.json").read_text())["wandb"]
    config = {}
    for record in records:
        if record["type"] == "run":
            config.update(record["run"]["config"]["update"])
        elif record["type"] == "config":
            config.update(record["config"].get("update", {}))
    config.pop("_wandb", None)
    assert config == flat_params(CONFIG)
    assert wandb_series(records) == expected_series()
    assert {"offline": True}.items() <= runs[0]["telemetry"]["feature"].items()


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log_run("wandb", tmp_path, rows=ROWS[:2])

    log_run("wandb", tmp_path, rows=ROWS[2:], resumed_after=1)

    records = wandb_records(tmp_path)
    assert len({r["run"]["run_id"] for r in records if r["type"] == "run"}) == 1
    assert wandb_series(records) == expected_series()


# -- MLflow --------------------------------------------------------------------------------------


def mlflow_run(out: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    uri = (out / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(run_id)
    client = MlflowClient(tracking_uri=uri)
    series = {key: [(m.step, m.value) for m in
                    sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
              for key in run.data.metrics}
    return run, series


def test_mlflow_logs_every_row_and_the_config_to_the_run_directory(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)

    log_run("mlflow", tmp_path)

    run, series = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params == {key: "null" if value is None else str(value)
                               for key, value in flat_params(CONFIG).items()}
    assert series == expected_series()
    assert run.data.metrics["accuracy"] == ROWS[-1]["accuracy"]  # the latest value


def test_mlflow_resume_continues_the_run_and_keeps_its_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_run("mlflow", tmp_path, rows=ROWS[:2])
    first, _ = mlflow_run(tmp_path)
    resumed_config = {**CONFIG, "verbose": True}  # a key a resume may change

    tracker = open_tracker("mlflow", tmp_path, resumed_after=1)
    tracker.log_params(flat_params(resumed_config))
    tracker.log_metrics(2, logged(ROWS[2]))
    tracker.close()

    run, series = mlflow_run(tmp_path)
    assert run.info.run_id == first.info.run_id
    assert run.data.params["verbose"] == "False"  # MLflow keeps a param's first value
    assert series == expected_series()


# -- the config key ------------------------------------------------------------------------------


def test_tracking_is_off_by_default_and_checked():
    assert RunConfig.from_dict({}).tracking is None
    assert RunConfig.from_dict({"tracking": "mlflow"}).tracking == "mlflow"
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"tracking": "neptune"})
    assert str(error.value) == "tracking 'neptune' is unknown; choose one of: tensorboard, wandb, mlflow"


def test_a_missing_tracking_library_is_a_one_line_config_error(monkeypatch):
    # Prepare: an environment without wandb
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))

    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"tracking": "wandb"})

    assert str(error.value) == ("tracking=wandb needs the wandb package; pip install wandb (or "
                                "fedlora's extra: pip install -e \".[tracking]\"), or set "
                                "tracking=null")


def test_no_tracker_writes_nothing(tmp_path):
    tracker = open_tracker(None, tmp_path)
    tracker.log_params(flat_params(CONFIG))
    tracker.log_metrics(0, logged(ROWS[0]))
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_tracker_costs_one_warning_not_the_run(tmp_path, caplog):
    # Prepare: DIR/tensorboard cannot be a folder (a file holds its name)
    (tmp_path / "tensorboard").write_text("not a folder")

    # Execute: what the round loop calls
    tracker = open_tracker("tensorboard", tmp_path)
    tracker.log_params(flat_params(CONFIG))
    for row in ROWS:
        tracker.log_metrics(row["round"], logged(row))
    tracker.close()

    # Assert: one warning naming the tracker; every later call is a no-op
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedlora"]
    assert len(warnings) == 1 and warnings[0].startswith("tracking=tensorboard failed (")
    assert warnings[0].endswith("the run goes on without it, results.jsonl has every row")


def test_a_tracker_failing_mid_run_stops_tracking_after_one_warning(caplog):
    class Flaky:
        calls = 0

        def log_params(self, params):
            pass

        def log_metrics(self, step, metrics):
            Flaky.calls += 1
            raise ConnectionError("tracking server unreachable\nretry details")

        def close(self):
            raise AssertionError("a failed tracker is not closed again")

    tracker = tracking.Guarded("mlflow", Flaky)
    for row in ROWS:
        tracker.log_metrics(row["round"], logged(row))
    tracker.close()

    assert Flaky.calls == 1
    assert [r.getMessage() for r in caplog.records if r.name == "fedlora"] == [
        "tracking=mlflow failed (ConnectionError: tracking server unreachable); the run goes on "
        "without it, results.jsonl has every row"]
