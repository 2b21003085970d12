"""End to end on Ray: determinism, simulated client crashes, and SIGKILL + ``resume=DIR``.

Real ``python -m fedlora.simulate`` runs on the embedded model, tiny (4 clients, 2 a round, 2
local steps of 16-token batches). Fed-SB and FedEx-LoRA are used because their clients keep
state between rounds (B and A; the base delta) in Context.state, which a restart loses and the
server must restore.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora.clients.app import simulated_crash
from fedlora.run.checkpoint import FINAL_ADAPTER

TINY = ("strategy=fedsb", "clients=4", "clients_per_round=2", "local_steps=2", "max_length=16",
        "fedsb.init_samples=32")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.simulate", *overrides]


def simulate(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*overrides), capture_output=True, text=True, timeout=timeout,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


def participation(run_dir: Path) -> list[list[int]]:
    """Partition ids sampled in rounds 1, 2, ... (``participation.csv``)."""
    lines = (run_dir / "participation.csv").read_text().splitlines()[1:]
    return [[p for p, flag in enumerate(line.split(",")[1:]) if flag == "1"] for line in lines]


FAULTY = (*TINY, "rounds=3", "faults.crash_prob=0.4")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faulty")
    simulate(*FAULTY, f"out={out}")
    return out


@pytest.mark.slow  # a real simulation
def test_seeded_crashes_are_left_out_and_counted(faulty_run):
    # Execute: the fixture ran 3 rounds in which clients fail at random
    rows = rows_of(faulty_run)

    # Assert: the failures are exactly the seeded crashes of the sampled clients
    expected = [sum(simulated_crash(0, t, p, 0.4) for p in sampled)
                for t, sampled in enumerate(participation(faulty_run), start=1)]
    assert [r["clients_failed"] for r in rows[1:]] == expected
    assert [r["clients_trained"] for r in rows[1:]] == [2 - f for f in expected]
    assert sum(expected) > 0, "seed 0 should crash someone in 3 rounds at p = 0.4"
    assert "simulated crash of partition" in (faulty_run / "run.log").read_text()
    summary = json.loads((faulty_run / "summary.json").read_text())
    assert summary["clients_failed_total"] == sum(expected)


@pytest.mark.slow
def test_same_seed_gives_identical_results(faulty_run, tmp_path):
    # Execute: the same config again, in new processes
    simulate(*FAULTY, f"out={tmp_path}")

    # Assert: identical rows but for the timing
    first, second = rows_of(faulty_run), rows_of(tmp_path)
    assert without_timing(first) == without_timing(second)
    assert [r["wall_s"] for r in first] != [r["wall_s"] for r in second]
    final = torch.load(faulty_run / FINAL_ADAPTER)["adapter"]
    again = torch.load(tmp_path / FINAL_ADAPTER)["adapter"]
    assert all(torch.equal(final[k], again[k]) for k in final)


def session_processes(session_id: int) -> list[int]:
    """Processes still alive in a session (a killed run's Ray workers would be)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    alive.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("fedsb", ()), ("fedex", ()),  # client state: B and A; the base delta
    ("fedsb", ("dp.epsilon=8",)),  # and the DP accountants (the server's copy restores them)
], ids=["fedsb", "fedex", "fedsb-dp"])
def test_sigkill_after_round_5_then_resume_equals_uninterrupted_run(strategy, extra, tmp_path):
    # Prepare: the uninterrupted 10-round reference
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    tiny = (f"strategy={strategy}", *TINY[1:], *extra)
    simulate(*tiny, "rounds=10", f"out={reference}")

    # Execute: the same run, SIGKILLed (server, Ray and all) once its round-5 row is written
    process = subprocess.Popen(command(*tiny, "rounds=10", f"out={run_dir}"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (run_dir / "results.jsonl").is_file() or len(rows_of(run_dir)) < 6:
            assert process.poll() is None and time.time() < deadline, "the run ended early"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for _ in range(100):  # Ray's processes die with the group
        if not session_processes(process.pid):
            break
        time.sleep(0.1)
    assert not session_processes(process.pid)
    rows_at_kill = rows_of(run_dir)
    simulate("resume=" + str(run_dir))

    # Assert: killed after round 5 (and before round 10), nothing lost, the same results
    assert 6 <= len(rows_at_kill) < 11
    assert rows_of(run_dir)[: len(rows_at_kill)] == rows_at_kill
    assert without_timing(rows_of(run_dir)) == without_timing(rows_of(reference))
    final = torch.load(run_dir / FINAL_ADAPTER)["adapter"]
    expected = torch.load(reference / FINAL_ADAPTER)["adapter"]
    assert set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in final)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_after_rounds"] and summary["recovery_bytes_down"] > 0
    assert participation(run_dir) == participation(reference)
    if extra:  # DP: the same epsilon spent per client as without the kill
        assert rows_of(run_dir)[-1]["epsilon"] > 0
        privacy = json.loads((run_dir / "privacy.json").read_text())
        assert privacy == json.loads((reference / "privacy.json").read_text())


def test_resume_refuses_a_changed_config(tmp_path):
    # Prepare: a run directory as a finished or killed run leaves it (no Ray needed)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("strategy: fedsb\nclients: 4\nrounds: 10\n")

    # Execute
    done = subprocess.run(command(f"resume={tmp_path}", "rounds=12"), capture_output=True,
                          text=True, timeout=120, env=ENV)

    # Assert
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: resume: rounds=12 differs from the run's rounds=10; a "
                                   "resumed run keeps its config (drop rounds= or set it to 10)")
