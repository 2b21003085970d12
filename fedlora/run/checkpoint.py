"""The server's checkpoint: everything a killed run needs to continue exactly where it was.

``DIR/checkpoint.pt`` (``torch.save``) holds, after the round it names: the global adapter
state, the strategy's ``state_dict()`` (its RNG, participation model, FedAU counters, the record
of which version of each kept part every client holds, FedEx's residuals, and whatever a
subclass adds),
the byte ledger, the rows written so far, the loop's bookkeeping, the process RNG states
(Python, NumPy, torch) and the config. It is written to a temporary file and renamed over the
old one, so a kill at any moment leaves either the previous or the new checkpoint, whole.

It is a pickle: load only checkpoints your own runs wrote.
"""

from __future__ import annotations

import os
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
    return torch.load(path, weights_only=False)  # our own file: RNG states are numpy objects


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
