"""``ray.address``: a simulation joins a Ray cluster someone started with ``ray start``.

The slow test starts a one-node head of its own (its own temp dir, free ports, its own process
group) and stops exactly that head afterwards: other people run Ray on the same machine, and a
bare ``ray stop`` would kill their clusters and simulations too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import yaml

from fedlora.run.cli import resumed_config
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.simulate import ray_head

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}


def free_port() -> int:
    """A local TCP port nothing listens on (the OS picks it; closed again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulate(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.simulate", *overrides]


@pytest.mark.parametrize("address", ["10.0.0.5", "ray://10.0.0.5:10001", "10.0.0.5:0",
                                     "10.0.0.5:65536", "10.0.0.5:port"])
def test_malformed_address_is_a_config_error_naming_the_key(address):
    with pytest.raises(ConfigError, match=r"^ray\.address=.* is not auto or HOST:PORT; give"):
        RunConfig.from_dict({"ray": {"address": address}})


def test_head_address_and_auto_pass_the_config_check():
    assert RunConfig.from_dict({"ray": {"address": "10.0.0.5:6379"}}).ray.address == "10.0.0.5:6379"
    assert RunConfig.from_dict({"ray": {"address": "auto"}}).ray.address == "auto"
    assert RunConfig.from_dict({}).ray.address is None


def test_auto_follows_ray_address_and_checks_that_head(monkeypatch):
    # Prepare: RAY_ADDRESS names a head that is not there
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")

    # Execute / Assert: refused at once, the resolved head in the message
    with pytest.raises(ConfigError, match=rf"^ray\.address=auto: no Ray head answers at "
                                          rf"127\.0\.0\.1:{port} "):
        ray_head("auto")


def test_a_resumed_run_may_go_on_elsewhere_but_keeps_what_it_computes(tmp_path):
    # Prepare: a run that was started on a cluster and wrote a checkpoint
    saved = RunConfig.from_dict({"strategy": "fedavg", "rounds": 7,
                                 "ray": {"address": "10.0.0.5:6379"}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved.to_dict(), "out": str(tmp_path)}))
    torch.save({}, tmp_path / "checkpoint.pt")  # a whole (empty) checkpoint file
    here = RunConfig.from_dict({"ray": {"address": "10.0.0.9:6379"}})

    # Execute: resume=DIR ray.address=10.0.0.9:6379 (the old head is gone)
    resumed = resumed_config(tmp_path, here, ["resume", "ray.address"])

    # Assert: the new placement, the saved computation
    assert resumed.ray.address == "10.0.0.9:6379"
    assert (resumed.strategy, resumed.rounds) == ("fedavg", 7)
    assert resumed == RunConfig.from_dict({"strategy": "fedavg", "rounds": 7,
                                           "ray": {"address": "10.0.0.9:6379"}})


def test_unreachable_head_is_one_line_and_exit_code_2_not_a_hang(tmp_path):
    # Prepare: a port nothing listens on (ray.init alone retries it for minutes)
    port = free_port()

    # Execute
    started = time.monotonic()
    done = subprocess.run(simulate("strategy=fedavg", "clients=2", "rounds=1",
                                   f"ray.address=127.0.0.1:{port}", f"out={tmp_path / 'run'}"),
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    elapsed_s = time.monotonic() - started

    # Assert: the key, the address and the fix on one line; refused before the data loads
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"error: ray.address=127.0.0.1:{port}: no Ray head answers at ")
    assert "ray start --head --port=PORT" in lines[0]
    assert not (tmp_path / "run" / "results.jsonl").exists()
    assert elapsed_s < 60


def start_head(temp_dir: Path, port: int) -> subprocess.Popen:
    """``ray start --head`` in a new session: every process of this head (GCS, raylet, their
    workers) stays in the process group whose id is the returned process's pid."""
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=ENV)
    log, _ = head.communicate(timeout=180)
    assert head.returncode == 0, log[-3000:]
    return head


def stop_head(process_group: int) -> None:
    """Stop this head's processes only: SIGTERM to its process group, SIGKILL what is left."""
    try:
        os.killpg(process_group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(process_group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(process_group, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_simulation_runs_on_a_started_ray_head(tmp_path):
    # Prepare: a one-node cluster; a short temp dir (Ray's socket paths must fit in 107 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="fedlora-ray-"))
    port = free_port()
    out = tmp_path / "run"
    head = start_head(temp_dir, port)
    try:
        # Execute
        run = subprocess.Popen(
            simulate("strategy=fedavg", "clients=2", "clients_per_round=2", "rounds=1",
                     "local_steps=1", "batch_size=4", f"ray.address=127.0.0.1:{port}",
                     f"out={out}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        stdout, stderr = run.communicate(timeout=600)

        # Assert: the run finished (round 0's evaluation and round 1's aggregate) ...
        assert run.returncode == 0, stderr[-3000:]
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [row["round"] for row in rows] == [0, 1]
        # ... as a driver of this head: Ray names each driver's log by job id and process id,
        # and a local instance would have written it under /tmp/ray instead
        logs = temp_dir / "session_latest" / "logs"
        assert list(logs.glob(f"python-core-driver-*_{run.pid}.log")), sorted(
            p.name for p in logs.iterdir())
        # ... whose clients ran in this head's workers, under that job
        job_id = next(logs.glob(f"python-core-driver-*_{run.pid}.log")).name.split("-")[3][:8]
        assert list(logs.glob(f"worker-*-{job_id}-*.out"))
    finally:
        stop_head(head.pid)
        # The head's processes are gone (only the group's zombies, if any, remain to be reaped)
        table = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout
        survivors = [state for group, state in (line.split() for line in table.splitlines())
                     if int(group) == head.pid]
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
    assert all(state.startswith("Z") for state in survivors), survivors
