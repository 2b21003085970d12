"""``python -m fedlora.simulate key=value ...``: a federated run in Flower's simulation engine.

The ServerApp (``fedlora.run.server``) and the ClientApp (``fedlora.clients.app``) run through
``flwr.simulation.run_simulation`` on Ray: one virtual SuperNode per client, each Ray worker
serving many of them with one copy of the base model (with ``client_hosts`` or
``client_batch`` > 1: fewer nodes, each hosting several clients, ``fedlora.run.hosted``). Config keys: ``fedlora/conf/config.yaml``
(Hydra: ``key=value`` overrides, ``-m`` for sweeps). The whole config, the data and the model
are checked before Ray starts; a bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedlora.run.cli import (CONF_DIR, check_command_line, check_paths, fail, register_hydra_config,
                             resumed_config)
from fedlora.config import RunConfig, resolve_noise
from fedlora.core.errors import ConfigError

# Flower must not try to install the app's dependencies itself (it would pull a CUDA torch).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1" if not os.environ.get("FEDLORA_ONLINE") else "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning


def run(cfg: RunConfig, out, resume: bool = False, interrupts=None) -> dict:
    """Run one federated simulation; write ``out``; return the summary dict.
    ``resume``: continue the killed run in ``out`` from its checkpoint. ``interrupts``: the
    launcher's Ctrl-C handling (``fedlora.run.stop.Interrupts``), which this run's round loop
    obeys; a stopped run never returns (``Interrupts.exit``)."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context
    from flwr.simulation import run_simulation

    from fedlora.clients.app import app as client_app
    from fedlora.run.cli import setup_logging
    from fedlora.run.hosted import HostedGrid
    from fedlora.run.server import prepare, run_server
    from fedlora.run.stop import RunStopped, StoppableGrid

    out = Path(out)
    cfg = resolve_noise(cfg, deployment=False)  # null: reproducible DP noise in simulation
    ray_address = ray_head(cfg.ray.address) if cfg.ray.address else "local"  # before data loads
    data, bundle = prepare(cfg)
    quiet = not cfg.verbose
    setup_logging(out, quiet)

    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if interrupts is not None:  # on Flower's grid: it polls Flower's push/pull for a stop
            interrupts.serving.set()
            grid = StoppableGrid(grid, interrupts.stop)
        if cfg.hosts is not None:  # nodes hosting several clients each: one node id per client
            grid = HostedGrid(grid, cfg.clients, cfg.hosts, cfg.client_batch)
        try:
            result["summary"] = run_server(grid, cfg, out, bundle, data, resume=resume)
        except RunStopped:
            pass  # Ctrl-C: the launcher prints where the run can go on from
        finally:
            if interrupts is not None:
                interrupts.server_done.set()

    # "local" even for null: Ray's own default would join whatever cluster RAY_ADDRESS or the
    # last `ray start` on this machine names, which on a shared machine is someone else's.
    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
               "init_args": {"address": ray_address,
                             "include_dashboard": False, "log_to_driver": not quiet,
                             "logging_level": logging.WARNING if quiet else logging.INFO}}
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.hosts or cfg.clients,
                   backend_config=backend, verbose_logging=cfg.verbose)
    if interrupts is not None and interrupts.stop.is_set():
        interrupts.exit()  # Flower ended after the stopped loop; the stop ends the process
    if "summary" not in result:
        raise RuntimeError(f"the simulation ended without finishing its rounds; rows so far are in {out}")
    return result["summary"]


def ray_head(address: str, timeout_s: float = 10.0) -> str:
    """The HOST:PORT of the Ray cluster ``ray.address`` names, checked to accept connections
    (``ray.init`` retries an unreachable head for minutes without a word). ``auto``: the head
    RAY_ADDRESS names, else the one the last ``ray start`` on this machine joined; never Ray's
    own fallback for ``auto``: any Ray instance running here (on a shared machine, another
    user's)."""
    import socket

    from ray._private.services import find_bootstrap_address

    head = address
    if address == "auto":
        head = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
        if not head:
            raise ConfigError("ray.address=auto but `ray start` has not made this machine part of "
                              "a Ray cluster; run it first (ray start --head, or ray start "
                              "--address=HEAD:PORT) or give the head as ray.address=HOST:PORT")
    host, _, port = head.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise ConfigError(f"ray.address={address}: no Ray head answers at {head} ({error}); "
                          "start it with `ray start --head --port=PORT` or fix the "
                          "address") from None
    return head


def hydra_task(conf) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from fedlora.config import RunConfig
    from fedlora.model.pretrained import model_path
    from fedlora.report.results import final_line
    from fedlora.run.stop import Interrupts

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
        task = cfg.task_spec()
        task.dataset()
        task.check_model(model_path(cfg.model))
        with Interrupts(out, resume_command(out, cfg)) as interrupts:
            summary = run(cfg, out, resume=bool(raw.get("resume")), interrupts=interrupts)
    except ConfigError as error:
        fail(str(error))
    print(f"{final_line(summary)}; results in {out}")


def resume_command(out: Path, cfg: RunConfig) -> str:
    """The command that continues this run after a stop (the run's own config is in ``out``;
    where its clients run is not)."""
    ray = f" ray.address={cfg.ray.address}" if cfg.ray.address else ""
    return f"python -m fedlora.simulate resume={out}{ray}"


def main() -> None:
    import hydra

    try:
        check_command_line(sys.argv[1:])  # Hydra's refusals as one line, before it starts
        check_paths(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    register_hydra_config()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(hydra_task)()


if __name__ == "__main__":
    main()
