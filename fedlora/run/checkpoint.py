"""The server's checkpoint: everything a killed run needs to continue exactly where it was.

``DIR/checkpoint.pt`` (``torch.save``) holds, after the round it names: the global adapter
state, the strategy's ``state_dict()`` (its RNG, participation model, FedAU counters, the record
of which version of each kept part every client holds, FedEx's residuals, and whatever a
subclass adds),
the byte ledger, the rows written so far, the loop's bookkeeping, the process RNG states
(Python, NumPy, torch) and the config. It is written to a temporary file and renamed over the
old one, so a kill at any moment leaves either the previous or the new checkpoint, whole.

Only tensors and plain Python values (dicts, lists, tuples, strings, numbers, None): it is
loaded with ``torch.load(weights_only=True)``, which builds nothing else, so a planted or
tampered file cannot run code. With secret DP noise it holds no state of any DP draw: the
server's key streams (``fedlora.privacy.randomness.KeyStream``) refuse to be pickled, and a
resumed run draws fresh randomness. (The process RNG states are no DP randomness: every DP
draw comes from a key stream or, reproducible, from a generator of its own.)
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from fedlora.core.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
FINAL_ADAPTER = "final_adapter.pt"


def save_atomic(payload, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def check_checkpoint(run_dir: Path) -> None:
    """Raise ``ConfigError`` unless ``run_dir/checkpoint.pt`` is a whole ``torch.save`` archive
    (a zip file: its central directory is at the end, and every member's CRC must match), so a
    file cut short by a copy is refused before anything starts, without unpickling it."""
    import zipfile

    path = Path(run_dir) / CHECKPOINT
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        damaged = None if bad_member is None else f"member {bad_member} fails its CRC check"
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        damaged = f"{type(error).__name__}: {error}"
    if damaged is not None:
        raise ConfigError(f"resume={run_dir}: {path} is damaged or cut short ({damaged}); the "
                          "run cannot continue from it: copy the file again whole, or start a "
                          "new run")


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run wrote no checkpoint "
                                "(checkpoint_every=0, or it died before round 0 ended)")
    check_checkpoint(run_dir)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = str(error).split("Unsupported global: ", 1)[-1].split(" was not", 1)[0]
        raise ConfigError(f"resume={run_dir}: {path} holds more than tensors and plain values "
                          f"({refused.splitlines()[0][:120]}): a file written by an older "
                          "fedlora or not by fedlora, which could run code when loaded; it is "
                          "refused: start a new run") from None


def rng_states() -> dict:
    """The process RNG states as tensors and plain values (``weights_only`` loads them)."""
    numpy_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {**numpy_state, "state": {"key": torch.from_numpy(
                numpy_state["state"]["key"].astype(np.int64)), "pos": numpy_state["state"]["pos"]}},
            "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
