"""Ctrl-C during a simulation: stopped within seconds, one line, resumable, nothing left running.

The first Ctrl-C (SIGINT) asks the round loop to stop. The loop talks to the clients through
a ``StoppableGrid``, which raises ``RunStopped`` at its next wait for replies (within
``POLL_S``); the loop's ``finally`` closes ``results.jsonl`` and the tracker; the launcher prints
one line (the round of the last checkpoint and the ``resume=`` command), ends every process this
one started (Ray's head, its workers, W&B's service) and exits with code 130. The round being
trained is abandoned: ``resume=DIR`` goes on after the last checkpoint
(``fedlora.run.checkpoint``: written every ``checkpoint_every`` rounds, atomically).

The loop does not always reach a wait for replies at once (the server's evaluation of a large
model, the set-up before round 1): after ``GRACE_S`` the launcher stops without it, and a
second Ctrl-C stops at once. Either way the checkpoint on disk is whole, and a row cut short in
``results.jsonl`` is skipped on resume (``fedlora.report.results``).

A deployment's launcher (``fedlora.deploy``) stops its processes itself and prints the same
line (``stop_line``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from fedlora.run.checkpoint import CHECKPOINT

POLL_S = 0.1  # how often a wait for replies looks for them and for a stop request
GRACE_S = 8.0  # how long the first Ctrl-C waits for the round loop to stop by itself
# SIGINT only: once Ray runs in this process, its driver handles SIGTERM itself (it aborts;
# the checkpoint on disk stays whole).
SIGNALS = (signal.SIGINT,)
EXIT_CODE = 130  # 128 + SIGINT: the shell's convention for a run stopped by Ctrl-C


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C); raised inside the round loop."""


class StoppableGrid:
    """A Flower grid whose waits end when ``stop`` is set: ``send_and_receive`` (as Flower's,
    polling every ``POLL_S``) and ``get_node_ids`` raise ``RunStopped`` then. Everything else
    is the wrapped grid's."""

    def __init__(self, grid, stop: threading.Event):
        self._grid = grid
        self._stop = stop

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _check(self) -> None:
        if self._stop.is_set():
            raise RunStopped

    def get_node_ids(self):
        self._check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout: float | None = None):
        import time

        self._check()
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies = []
        while waiting and (end is None or time.time() < end):
            found = list(self._grid.pull_messages(waiting))
            replies += found
            waiting -= {reply.metadata.reply_to_message_id for reply in found}
            if waiting and self._stop.wait(POLL_S):
                raise RunStopped
        return replies


def checkpoint_round(run_dir: Path) -> int | None:
    """The round ``run_dir/checkpoint.pt`` was written after, or None (no whole checkpoint)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        import torch

        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["round"])
    except Exception:  # noqa: BLE001 (a file cut short by a copy: nothing to resume from)
        return None


def stop_line(run_dir: Path, resume_command: str) -> str:
    """What a stopped run prints: where it can go on from, and the command that does."""
    last = checkpoint_round(run_dir)
    if last is None:
        return (f"stopped before the first checkpoint of {run_dir} (checkpoint_every=0, or round 0 "
                "had not ended): nothing to resume; start the run again")
    return (f"stopped after round {last} (checkpoint {Path(run_dir) / CHECKPOINT}); resume with: "
            f"{resume_command}")


def end_child_processes(grace_s: float) -> None:
    """SIGTERM to every process this one started (and theirs), SIGKILL to those alive after
    ``grace_s``. psutil (a peft dependency) lists them by parent, whatever their group."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            if grace_s > 0:
                child.terminate()
            else:
                child.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s if grace_s > 0 else 1.0)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


class Interrupts:
    """The simulation launcher's Ctrl-C handling, installed in the main thread for the whole
    run (``with Interrupts(out, command) as interrupts:``). The server side reports through
    ``serving`` (the round loop runs; it reads ``stop`` through a ``StoppableGrid``) and
    ``server_done`` (it returned or raised)."""

    def __init__(self, run_dir: Path, resume_command: str):
        self.run_dir = Path(run_dir)
        self.resume_command = resume_command
        self.stop = threading.Event()
        self.serving = threading.Event()
        self.server_done = threading.Event()
        self._announced = False
        self._lock = threading.RLock()
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop.is_set():  # the second: no more waiting
            self.exit(grace_s=0.0)
        self.stop.set()
        # The main thread waits inside Flower and Ray; the stop completes in a thread of its own.
        threading.Thread(target=self.exit, daemon=True).start()

    def exit(self, grace_s: float = 2.0) -> None:
        """Wait (up to ``GRACE_S``) for the round loop to stop, print the line, end the child
        processes and leave. Nothing runs after this process's line: its output is closed
        first (a Ray worker killed under a waiting thread would have it log a traceback)."""
        if grace_s and self.serving.is_set():
            self.server_done.wait(GRACE_S)
        with self._lock:
            if not self._announced:
                self._announced = True
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[?25h")  # the progress bar hides the cursor
                sys.stdout.flush()
                print(stop_line(self.run_dir, self.resume_command), file=sys.stderr, flush=True)
                logging.disable(logging.CRITICAL)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
        end_child_processes(grace_s)
        os._exit(EXIT_CODE)
