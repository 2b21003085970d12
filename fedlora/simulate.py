"""``python -m fedlora.simulate key=value ...``: a federated run in Flower's simulation engine.

The ServerApp (``fedlora.server``) and the ClientApp (``fedlora.clients.app``) run through
``flwr.simulation.run_simulation`` on Ray: one virtual SuperNode per client, each Ray worker
serving many of them with one copy of the base model. Config keys: ``fedlora/conf/config.yaml``
(Hydra: ``key=value`` overrides, ``-m`` for sweeps). The whole config, the data and the model
are checked before Ray starts; a bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.errors import ConfigError

if TYPE_CHECKING:  # imported where used: a bad key on the command line is refused without torch
    from fedlora.config import RunConfig

CONF_DIR = Path(__file__).parent / "conf"

# Flower must not try to install the app's dependencies itself (it would pull a CUDA torch).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1" if not os.environ.get("FEDLORA_ONLINE") else "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning


def run(cfg: RunConfig, out, resume: bool = False) -> dict:
    """Run one federated simulation; write ``out``; return the summary dict.
    ``resume``: continue the killed run in ``out`` from its checkpoint."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context
    from flwr.simulation import run_simulation

    from fedlora.clients.app import app as client_app
    from fedlora.server import prepare, run_server

    out = Path(out)
    data, bundle = prepare(cfg)
    quiet = not cfg.verbose
    setup_logging(out, quiet)

    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result["summary"] = run_server(grid, cfg, out, bundle, data, resume=resume)

    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
               "init_args": {"include_dashboard": False, "log_to_driver": not quiet,
                             "logging_level": logging.WARNING if quiet else logging.INFO}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                   backend_config=backend, verbose_logging=cfg.verbose)
    if "summary" not in result:
        raise RuntimeError(f"the simulation ended without finishing its rounds; rows so far are in {out}")
    return result["summary"]


def setup_logging(out: Path, quiet: bool) -> None:
    """fedlora's and Flower's log lines go to ``out/run.log``; the console gets warnings only
    (and the progress lines) unless ``verbose=true``."""
    out.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(out / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("fedlora", "flwr"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(file_handler)
        for handler in logger.handlers:
            if handler is not file_handler and isinstance(handler, logging.StreamHandler):
                # Flower's console warnings (run_simulation's deprecation, skipped federated
                # evaluation) are expected here; they stay in run.log.
                handler.setLevel(logging.ERROR if quiet and name == "flwr" else
                                 logging.WARNING if quiet else logging.INFO)
    if not logging.getLogger("fedlora").handlers[:-1]:
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING if quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedlora").addHandler(console)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _paths(tree: dict, prefix: str = "") -> set[str]:
    """Every dotted key path of a nested config dict."""
    paths = set()
    for key, value in tree.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= _paths(value, prefix + key + ".")
    return paths


def check_command_line(argv: list[str]) -> None:
    """Reject unknown keys and group choices before Hydra (whose errors are multi-line)."""
    import yaml

    keys = _paths({k: v for k, v in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).items()
                   if k not in ("defaults", "hydra")})
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF_DIR.iterdir() if d.is_dir()}
    for group in groups:
        for option in (CONF_DIR / group).glob("*.yaml"):
            keys |= _paths(yaml.safe_load(option.read_text()), group + ".")
    for arg in argv:
        if arg.startswith(("-", "hydra.", "hydra/", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key in groups:
            for choice in value.split(","):
                if choice not in groups[key]:
                    fail(f"{key} '{choice}' is unknown; choose one of: {', '.join(groups[key])}")
        elif key not in keys:
            fail(f"'{key}' is not a fedlora setting; see fedlora/conf/config.yaml for the valid keys")


def check_paths(argv: list[str]) -> None:
    """``out=`` must be a directory this process can create and write, ``resume=`` an existing
    directory (else ``ConfigError``): checked before Hydra, which creates the run directory (a
    traceback if it can't).
    A sweep (``-m``) writes under ``multirun/`` instead, so it is left to its runs."""
    import tempfile

    if {"-m", "--multirun"} & set(argv):
        return
    given = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    resume, out = given.get("resume"), given.get("out")
    if resume not in (None, "", "null") and not Path(resume).expanduser().is_dir():
        raise ConfigError(f"resume={resume} has no checkpoint.pt and config.yaml; give the "
                          "directory of a run that wrote a checkpoint")
    if out in (None, "", "null") or "${" in out or resume not in (None, "", "null"):
        return
    try:
        Path(out).expanduser().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=Path(out).expanduser()):
            pass
    except OSError as error:
        raise ConfigError(f"out={out} cannot be created or written ({error.strerror}); give a "
                          "directory you can write, e.g. out=outputs/my-run") from error


RESUME_MAY_CHANGE = ("resume", "out", "verbose")


def _saved_value(saved: dict, key: str):
    """The value of a command-line key in a saved ``config.yaml`` (``RunConfig.to_dict``)."""
    flat = {"partition.alpha": "partition_alpha",
            "partition.labels_per_client": "partition_labels_per_client"}
    node = saved
    for part in (flat[key] if key in flat else key + ".name" if key == "participation" else key).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resumed_config(run_dir: Path, command_line: RunConfig, given: list[str]) -> RunConfig:
    """The config of the run in ``run_dir``; a key given on the command line (``given``) may
    differ from it only if it is one of ``RESUME_MAY_CHANGE``."""
    import yaml

    from fedlora.checkpoint import check_checkpoint
    from fedlora.config import RunConfig

    saved_file = run_dir / "config.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not saved_file.is_file():
        raise ConfigError(f"resume={run_dir} has no checkpoint.pt and config.yaml; give the "
                          "directory of a run that wrote a checkpoint")
    saved = yaml.safe_load(saved_file.read_text())
    new = command_line.to_dict()
    for key in given:
        if key.split(".")[0] in RESUME_MAY_CHANGE + ("hydra",):
            continue
        was, now = _saved_value(saved, key), _saved_value(new, key)
        if was != now:
            raise ConfigError(f"resume: {key}={now} differs from the run's {key}={was}; a resumed "
                              f"run keeps its config (drop {key}= or set it to {was})")
    check_checkpoint(run_dir)  # a damaged one would fail only in the server, after Ray started
    return dataclasses.replace(RunConfig.from_saved(saved), verbose=command_line.verbose)


def hydra_task(conf) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from fedlora.config import RunConfig
    from fedlora.data import load_dataset
    from fedlora.models import model_path

    raw = OmegaConf.to_container(conf, resolve=True)
    hydra_config = HydraConfig.get()
    out = Path(hydra_config.runtime.output_dir)
    try:
        cfg = RunConfig.from_dict(raw)
        if raw.get("resume"):
            given = [o.split("=", 1)[0] for o in hydra_config.overrides.task if "=" in o]
            cfg, out = resumed_config(Path(raw["resume"]), cfg, given), Path(raw["resume"])
        # The data files and a local model directory are checked before Flower, Ray and
        # transformers are imported (seconds); ``prepare`` gets the data from the cache.
        load_dataset(cfg.data)
        model_path(cfg.model)
        summary = run(cfg, out, resume=bool(raw.get("resume")))
    except ConfigError as error:
        fail(str(error))
    print(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}); "
          f"bytes up {summary['bytes_up_total']:,} down {summary['bytes_down_total']:,}; "
          f"{summary['wall_s']:.0f} s; results in {out}")


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    check_command_line(sys.argv[1:])
    try:
        check_paths(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    # The run directory: resume's, else out, else a dated one (oc.select takes a null for set).
    OmegaConf.register_new_resolver(
        "first_set", lambda *values: next(v for v in values if v is not None), replace=True)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(hydra_task)()


if __name__ == "__main__":
    main()
