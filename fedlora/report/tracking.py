"""Experiment tracking: every results row, and the resolved config, to TensorBoard, W&B or MLflow.

``tracking=tensorboard|wandb|mlflow`` (off by default). The ServerApp's round loop hands a
``Tracker`` each row it appends to ``results.jsonl`` (its numbers: the task's scores and loss,
the mean training loss, the bytes up and down, epsilon, the clients counted, the wall time)
with the clients' learning rate of that round, against the round number; the config goes in
once, as hyper-parameters. The same loop runs in simulation and deployment, so both log.

Where each writes, unless the user's own settings say otherwise:

* ``tensorboard``: event files in ``DIR/tensorboard`` (``tensorboard --logdir DIR/tensorboard``;
  values in double precision, so a scalar equals its ``results.jsonl`` value; the config in the
  HParams tab);
* ``wandb``: an offline run in ``DIR/wandb`` (``wandb sync DIR/wandb/offline-run-*`` uploads
  it); ``WANDB_MODE`` (e.g. ``online`` after ``wandb login``), ``WANDB_PROJECT`` (default
  ``fedlora``) and ``WANDB_ENTITY`` are honoured;
* ``mlflow``: a file store in ``DIR/mlruns`` (``mlflow ui --backend-store-uri DIR/mlruns``),
  experiment ``fedlora``; ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` are honoured.

A resumed run (``resume=DIR``) goes on in the same tracked run: TensorBoard purges the steps
after the checkpoint, W&B resumes the run id and MLflow the run id that ``DIR/tracking.json``
holds. Each library is an optional extra (``pip install -e ".[tracking]"``); the config check
says which one to install when it is missing (``missing_package``).

Layer 4 (report): imports only ``fedlora.core``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Protocol

from flwr.common.config import flatten_dict

from fedlora.core.settings import run_config_values

TRACKERS = ("tensorboard", "wandb", "mlflow")
# What each tracker imports, and the package that provides it (pyproject.toml's extras).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
IDS_FILE = "tracking.json"  # the W&B and MLflow run ids a resumed run continues
EXPERIMENT = "fedlora"


class Tracker(Protocol):
    def log_params(self, params: dict) -> None:
        """The run's resolved config, once: flat ``{dotted.key: value}``."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One results row's numbers against the round number ``step``."""

    def close(self) -> None:
        """Flush and finish the tracked run (also after a failure or Ctrl-C)."""


def missing_package(kind: str) -> str | None:
    """The pip package ``tracking=kind`` needs and this environment lacks, else None."""
    module, package = PACKAGES[kind]
    return package if importlib.util.find_spec(module) is None else None


def numbers(row: dict) -> dict[str, float]:
    """A results row's numbers, as the trackers log them: ``round`` is the step, text (the
    strategy) and nulls (``epsilon`` without DP, ``train_loss`` in round 0) are left out."""
    return {key: float(value) for key, value in row.items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def flat_params(config: dict) -> dict:
    """A nested config as ``{dotted.key: value}`` (the command line's keys), lists as
    comma-separated text (as ``targets=query,value`` is written)."""
    return flatten_dict(run_config_values(config, null="null"))


def open_tracker(kind: str | None, out: Path, resumed_after: int | None = None) -> Tracker:
    """The tracker ``tracking=kind`` names (``NoTracker`` for None), writing under ``out``.
    ``resumed_after``: the checkpoint round a resumed run goes on from. A tracker that fails
    (a tracking server out of reach, a full disk) costs one warning, never the run."""
    if kind is None:
        return NoTracker()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracker_class = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                     "mlflow": MlflowTracker}[kind]
    return Guarded(kind, lambda: tracker_class(out, resumed_after))


class NoTracker:
    """``tracking=null``: nothing is imported, nothing is written."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Guarded:
    """A tracker whose first failure is logged as one warning and ends its tracking: the run
    goes on, and ``results.jsonl`` keeps every row."""

    def __init__(self, kind: str, make):
        self.kind = kind
        self.tracker: Tracker = NoTracker()
        self._call(lambda: setattr(self, "tracker", make()))

    def _call(self, action) -> None:
        try:
            action()
        except Exception as error:  # noqa: BLE001 (whatever the library raises)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            logging.getLogger("fedlora").warning(
                "tracking=%s failed (%s: %s); the run goes on without it, results.jsonl has "
                "every row", self.kind, type(error).__name__, first_line)
            self.tracker = NoTracker()

    def log_params(self, params: dict) -> None:
        self._call(lambda: self.tracker.log_params(params))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._call(lambda: self.tracker.log_metrics(step, metrics))

    def close(self) -> None:
        self._call(self.tracker.close)


def _saved_ids(out: Path) -> dict:
    path = out / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(out: Path, kind: str, value: str) -> None:
    ids = {**_saved_ids(out), kind: value}
    tmp = out / (IDS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2))
    tmp.replace(out / IDS_FILE)


class TensorBoardTracker:
    """Event files in ``out/tensorboard``. Every writer opens with a session start at the first
    step it logs (0, or the round after the checkpoint): TensorBoard drops what an earlier
    writer logged from that step on, so rounds redone after a resume are not shown twice."""

    def __init__(self, out: Path, resumed_after: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = out / "tensorboard"
        first_step = 0 if resumed_after is None else resumed_after + 1
        self.writer = SummaryWriter(str(self.logdir), purge_step=first_step)
        self.params: dict | None = None

    def log_params(self, params: dict) -> None:
        # Written with the first row: the HParams tab lists the metrics the config is judged by.
        self.params = {key: _hparam_value(value) for key, value in params.items()}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.params is not None:
            from torch.utils.tensorboard.summary import hparams

            file_writer = self.writer._get_file_writer()
            for summary in hparams(self.params, dict(metrics)):
                file_writer.add_summary(summary)
            self.params = None
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()  # a row is on disk once logged, as in results.jsonl

    def close(self) -> None:
        self.writer.close()


def _hparam_value(value):
    """TensorBoard's HParams take numbers, text and booleans: null becomes "null"."""
    return "null" if value is None else value if isinstance(value, (bool, int, float, str)) \
        else str(value)


class WandbTracker:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise, in ``out/wandb``. Every metric
    is plotted against ``round`` (W&B's own step only counts ``log`` calls)."""

    def __init__(self, out: Path, resumed_after: int | None):
        import wandb

        run_id = _saved_ids(out).get("wandb") if resumed_after is not None else None
        # console="off": the progress lines stay fedlora's own (W&B would capture stdout)
        settings = wandb.Settings(silent=True, console="off")
        self.run = wandb.init(dir=str(out), project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
                              name=out.name, id=run_id, resume="allow" if run_id else None,
                              mode=None if os.environ.get("WANDB_MODE") else "offline",
                              settings=settings)
        _save_id(out, "wandb", self.run.id)
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "round": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in a file store in ``out/mlruns`` (or where ``MLFLOW_TRACKING_URI`` points),
    experiment ``fedlora`` (or ``MLFLOW_EXPERIMENT_NAME``), named after the run directory."""

    def __init__(self, out: Path, resumed_after: int | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store in maintenance and asks for this opt-in to use it;
            # a run directory's own store needs no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = _saved_ids(out).get("mlflow") if resumed_after is not None else None
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            _save_id(out, "mlflow", self.run_id)
        self.tracking_uri = uri
        self.finished = False

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged value: a resumed run (whose verbose or ray.address
        # may differ) adds only keys the run lacks. At most 100 a call.
        logged = self.client.get_run(self.run_id).data.params
        items = [Param(key, "null" if value is None else str(value)) for key, value in params.items()
                 if key not in logged]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in metrics.items()])

    def close(self) -> None:
        if not self.finished:
            self.client.set_terminated(self.run_id)
            self.finished = True
