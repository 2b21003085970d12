"""Results files and the live progress display.

A run directory holds plain files, readable with ``json`` alone (no fedlora import needed):

* ``results.jsonl``: one JSON object per evaluated round (round 0 = before training), appended
  and flushed as each round ends, so nothing computed is lost if the run dies; a resumed run
  appends too, and never writes a round twice when it redoes it identically (see
  ``ResultsWriter``);
* ``summary.json``: final and best metrics, byte totals (one-time costs separately), the
  resolved config, package versions, seed and wall time;
* ``config.yaml``: the resolved config; ``partitions.json``: each client's examples and labels;
* ``participation.csv``: which clients were sampled in each training round (``round,c0,c1,...``,
  1 or 0; its row i is training round i + 1);
* ``error.txt`` (``RUN_ERROR``), only from a deployment's ServerApp that stopped on a
  ``ConfigError`` after it started (e.g. a node's DP policy refused the run): that one line,
  for the launcher (``fedlora.deploy``) to print.


Under DP the rows and the summary withhold (write as null) what counts the clients that took
part (``withheld_fields``): the DP mechanisms do not cover those counts.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

RUN_ERROR = "error.txt"

# Every row's fields besides the task's metrics (``fedlora.tasks.Task.metrics``: accuracy and
# loss for classification, exact_match and eval_loss for generation), which follow "strategy".
ROW_FIELDS = ("round", "strategy", "train_loss", "clients_trained", "clients_failed", "bytes_up",
              "bytes_down", "bytes_up_cum", "bytes_down_cum", "params_up_per_client", "epsilon",
              "wall_s")
# Under DP these are null: they count the clients of a round (its sample, less failures), an
# un-noised statistic. At client level the bytes go too, as they are that count times a
# message's size, and the sample itself is what the accountant's amplification keeps secret.
# ``rejected`` lists the partitions whose replies were rejected (their reasons stay in run.log)
CLIENT_COUNT_FIELDS = ("clients_trained", "clients_failed", "clients_failed_total",
                       "rounds_not_aggregated", "rejected")
BYTE_COUNT_FIELDS = ("bytes_up", "bytes_down", "bytes_up_cum", "bytes_down_cum",
                     "params_up_per_client", "bytes_up_total", "bytes_down_total",
                     "one_time_bytes_up", "one_time_bytes_down", "wire_bytes_up_total",
                     "wire_bytes_down_total", "recovery_bytes_down")
CLASSIFICATION_METRICS = ("accuracy", "loss")
PRIMARY_METRICS = ("accuracy", "exact_match")  # what compare/sweep look for in older runs
SHORT_NAMES = {"accuracy": "acc", "exact_match": "em"}


def primary_metric(rows: list[dict], summary: dict | None = None) -> str:
    """The metric a run is judged by: its summary's ``primary_metric``, else the first of
    ``PRIMARY_METRICS`` its rows hold (a run still going, or one from before the field)."""
    if summary and summary.get("primary_metric"):
        return summary["primary_metric"]
    for name in PRIMARY_METRICS:
        if rows and name in rows[0]:
            return name
    raise ValueError(f"the results rows hold none of {', '.join(PRIMARY_METRICS)}")

PACKAGES = ("fedlora", "torch", "flwr", "ray", "transformers", "peft", "opacus", "numpy")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def withheld_fields(dp) -> tuple[str, ...]:
    """The row and summary fields a run writes as null under ``dp`` (the run's ``dp``
    section): the client counts under any DP, and the byte counts too under client-level DP."""
    if not dp.enabled:
        return ()
    return CLIENT_COUNT_FIELDS + (BYTE_COUNT_FIELDS if dp.client_level else ())


def withheld(record: dict, dp) -> dict:
    """``record`` (a results row or the summary) with ``withheld_fields(dp)`` set to null."""
    hidden = set(withheld_fields(dp))
    return {key: None if key in hidden else value for key, value in record.items()}


def same_row(a: dict, b: dict) -> bool:
    """Rows equal in everything but the timing."""
    return {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


class ResultsWriter:
    """Appends round rows to ``results.jsonl`` and shows one progress line per round.

    ``resumed_rows``: the rows a resumed run's checkpoint had written. The file may hold later
    rows (of rounds run after the checkpoint, before the kill); they stay, and the resumed run
    redoes those rounds: a redone row equal to the one on file (but for ``wall_s``) is not
    written again, one that differs (not bit-exact hardware) is appended with ``"redone": true``
    (the last row of a round is the valid one).
    """

    def __init__(self, out: Path, config: dict, total_rounds: int,
                 resumed_rows: list[dict] | None = None,
                 metrics: tuple[str, str] = CLASSIFICATION_METRICS):
        self.metrics = tuple(metrics)  # (primary metric, held-out loss)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.rows: list[dict] = list(resumed_rows or [])
        self.on_file_after_checkpoint: list[dict] = []
        if resumed_rows is not None:
            self.on_file_after_checkpoint = read_results(self.out)[len(resumed_rows):]
            with (self.out / "results.jsonl").open("rb+") as f:  # a line cut by the kill
                if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                    f.write(b"\n")
        self.console = Console(stderr=False, highlight=False)
        # A live bar on terminals; elsewhere (CI, pipes) rich shows only the printed lines.
        self.progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"),
                                 console=self.console, transient=True)
        self.task = self.progress.add_task("", total=total_rounds)
        self.progress.start()
        if resumed_rows is None:  # a resumed run keeps the original config.yaml
            (self.out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._file = (self.out / "results.jsonl").open("a", encoding="utf-8")

    def write_json(self, name: str, payload) -> None:
        path = self.out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.replace(path)  # atomic: a reader never sees half a file

    def row(self, row: dict) -> None:
        missing = [f for f in (*ROW_FIELDS, *self.metrics) if f not in row]
        if missing:
            raise ValueError(f"results row lacks {missing}")
        self.rows.append(row)
        on_file = self.on_file_after_checkpoint.pop(0) if self.on_file_after_checkpoint else None
        if on_file is None or not same_row(on_file, row):
            if on_file is not None:
                row = {**row, "redone": True}
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        failed = f" ({row['clients_failed']} failed)" if row["clients_failed"] else ""
        epsilon = f"  eps {row['epsilon']:.3f}" if row["epsilon"] is not None else ""
        primary, loss = self.metrics
        score = f"{SHORT_NAMES.get(primary, primary)} {row[primary]:.4f}"
        # what a DP run withholds (null) is not printed either: the line may go to a log file
        clients = (f"  clients {row['clients_trained']}{failed}"
                   if row["clients_trained"] is not None else "")
        up, down = ((f"  up {human_bytes(row['bytes_up_cum'])}",
                     f"  down {human_bytes(row['bytes_down_cum'])}")
                    if row["bytes_up_cum"] is not None else ("", ""))
        self.progress.console.print(
            f"[bold]round {row['round']:>3}/{self.total_rounds}[/bold]  {score}  "
            f"{loss} {row[loss]:.4f}{epsilon}{clients}{up}{down}  "
            f"{row['wall_s']:.0f} s", soft_wrap=True)  # one line a round, also in a log file
        self.progress.update(self.task, completed=row["round"], description=score + up)
        sys.stdout.flush()

    def close(self) -> None:
        self.progress.stop()
        self._file.close()


def read_results(run_dir) -> list[dict]:
    """The rows of a run's ``results.jsonl`` (a convenience: plain ``json`` does the same),
    without a line a kill cut short."""
    rows = []
    with (Path(run_dir) / "results.jsonl").open(encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def final_line(summary: dict) -> str:
    """The line a finished run prints: its primary metric, bytes and time."""
    metric = summary.get("primary_metric", "accuracy")
    sent = ("" if summary["bytes_up_total"] is None else  # withheld under client-level DP
            f"; bytes up {summary['bytes_up_total']:,} down {summary['bytes_down_total']:,}")
    return (f"final {metric.replace('_', ' ')} {summary['final_' + metric]:.4f} (best "
            f"{summary['best_' + metric]:.4f}){sent}; {summary['wall_s']:.0f} s")


def elapsed(since: float) -> float:
    return round(time.time() - since, 3)


def build_summary(cfg, rows: list[dict], ledger, progress, *, params_per_client_formula,
                  adapted_layers: int, head_params: int, wall_s: float,
                  metrics: tuple[str, str] = CLASSIFICATION_METRICS, examples: dict | None = None,
                  precision: dict | None = None) -> dict:
    """``summary.json``: the final and best metrics of ``rows``, the byte totals of the
    ``ledger`` (``fedlora.report.comm.CommLedger``; one-time, wire and recovery bytes apart), the
    loop's totals (``progress``: failures, rounds not aggregated, resumptions, client
    processes, evaluation times), the per-client parameter formula, the resolved config and
    the package versions. ``metrics``: the task's (primary metric, held-out loss) row keys:
    ``primary_metric`` names the first, and ``final_/best_/initial_<metric>`` and
    ``final_<loss>`` are reported (classification: ``final_accuracy``, ``final_loss`` ...).
    ``examples``: the task's counts about its examples (e.g. truncated ones). ``precision``:
    what the server's process chose for ``precision`` (requested, chosen, the bf16 hardware it
    found; ``fedlora.model.pretrained.AdaptedModel.precision``), which simulated clients on the
    same machine choose too."""
    eval_seconds = progress.eval_seconds
    primary, loss = metrics
    return withheld({
        "strategy": cfg.strategy, "task": getattr(cfg, "task", None), "rounds": cfg.rounds,
        "seed": cfg.seed, "primary_metric": primary,
        f"final_{primary}": rows[-1][primary], f"final_{loss}": rows[-1][loss],
        f"best_{primary}": max(r[primary] for r in rows), f"initial_{primary}": rows[0][primary],
        **(examples or {}),
        "bytes_up_total": ledger.total("up"), "bytes_down_total": ledger.total("down"),
        "one_time_bytes_up": ledger.one_time["up"], "one_time_bytes_down": ledger.one_time["down"],
        "wire_bytes_up_total": ledger.wire["up"], "wire_bytes_down_total": ledger.wire["down"],
        "recovery_bytes_down": ledger.recovery["down"],
        "params_up_per_client": rows[-1]["params_up_per_client"],
        "epsilon": rows[-1]["epsilon"],  # DP: the most any client spent (privacy.json: each)
        "noise": cfg.dp.noise if cfg.dp.enabled else None,  # DP randomness: secret | reproducible
        "params_per_client_formula": params_per_client_formula,
        "adapted_layers": adapted_layers, "head_params": head_params,
        "clients_failed_total": progress.failed_total,
        "rounds_not_aggregated": progress.rounds_not_aggregated,
        "resumed_after_rounds": progress.resumed_at,
        "client_processes": {str(pid): builds for pid, builds in
                             sorted(progress.client_processes.items())},
        "eval_s_total": round(sum(eval_seconds), 3), "evaluations": len(eval_seconds),
        "precision": precision or {},
        "wall_s": wall_s, "config": cfg.to_dict(), "versions": package_versions(),
    }, cfg.dp)

