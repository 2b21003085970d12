"""LoRA-family adapter layers, written by hand from ``nn.Linear`` parts.

One layer serves every method::

    LoRA / FedIT / FFA / FedSVD / LoRA-FAIR / FedEx:  y = W0 x + b + s * B (A x)
    LoRA-SB / Fed-SB (arXiv 2411.19557, 2502.15436):   y = W0 x + b + s * B (R (A x))

with ``A`` (r x n) = ``lora_A.weight``, ``R`` (r x r) = ``lora_R.weight`` and ``B`` (m x r) =
``lora_B.weight``, the layout of ``nn.Linear.weight`` (out x in). Why not peft: peft has no
LoRA-SB layer, and building every factor as an ``nn.Linear`` lets Opacus compute per-sample
gradients with its native Linear rule, for every method alike. peft's table of default target
modules per architecture is reused, so any Hugging Face model gets sensible targets.

A state dict key names its part by its suffix: ``...lora_A.weight`` (A), ``...lora_B.weight``
(B), ``...lora_R.weight`` (R); the task head's keys are passed in from the model loader.
FedEx-LoRA's residuals for a layer's base weight travel as ``<layer>.base.residual`` (dense) or
``<layer>.base.residual_B`` / ``_A`` (factored): never adapter keys, so they cannot collide.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init

PARTS = ("A", "B", "R", "head")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update ``s * B [R] A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, latent: bool):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_R = nn.Linear(rank, rank, bias=False) if latent else None
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        # A bitsandbytes 4-bit base (an nn.Linear subclass) stores packed uint8: its factors are fp32.
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        for factor in (self.lora_A, self.lora_R, self.lora_B):
            if factor is not None:
                factor.to(device=base.weight.device, dtype=dtype)
        self.reset_lora()

    def set_rank(self, rank: int) -> None:
        """Give the factors ``rank`` (clients of different ranks share one cached model): new
        tensors of that shape, not initialised (the caller loads their values), drawing nothing
        from the random generators; the scale ``s`` stays that of the build, the same for every
        client rank. A no-op at the current rank."""
        if rank == self.rank:
            return
        weight = self.lora_A.weight
        options = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        self.lora_A = skip_init(nn.Linear, self.base.in_features, rank, **options)
        self.lora_B = skip_init(nn.Linear, rank, self.base.out_features, **options)
        if self.lora_R is not None:
            self.lora_R = skip_init(nn.Linear, rank, rank, **options)
        self.rank = rank

    @torch.no_grad()
    def reset_lora(self) -> None:
        """LoRA's init: A Kaiming-uniform (as peft), B = 0, R = I; so B [R] A = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_R is not None:
            self.lora_R.weight.copy_(torch.eye(self.rank))

    def delta_weight(self) -> torch.Tensor:
        """``s * B [R] A`` in the base weight's (out x in) layout."""
        middle = self.lora_A.weight if self.lora_R is None else self.lora_R.weight @ self.lora_A.weight
        return self.scale * self.lora_B.weight @ middle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_A(x)
        if self.lora_R is not None:
            hidden = self.lora_R(hidden)
        return self.base(x) + self.scale * self.lora_B(hidden)


def inject_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
                latent: bool) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends in one of ``targets`` by a ``LoRALinear``.

    Returns the module paths of the adapted layers (in model order). Raises ``ValueError`` if
    no layer matches.
    """
    adapted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha, latent))
            adapted.append(name)
    if not adapted:
        raise ValueError(f"no nn.Linear layer is named one of {list(targets)}")
    return adapted


def part_of(key: str, head_keys: frozenset[str]) -> str | None:
    """Which adapter part a state-dict key belongs to: 'A', 'B', 'R', 'head' or None (frozen base)."""
    if key.endswith("lora_A.weight"):
        return "A"
    if key.endswith("lora_B.weight"):
        return "B"
    if key.endswith("lora_R.weight"):
        return "R"
    if key in head_keys:
        return "head"
    return None


def factor_key(layer: str, part: str) -> str:
    """The state-dict key of a layer's factor ``part`` ('A', 'B' or 'R')."""
    return f"{layer}.lora_{part}.weight"


def layer_names(keys) -> list[str]:
    """The adapted layers named in state-dict keys (those with a B factor), in key order."""
    suffix = ".lora_B.weight"
    return [key[: -len(suffix)] for key in keys if key.endswith(suffix)]


def at_rank(key: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The tensor of state-dict ``key`` as a client of ``rank`` holds it: a factor's first
    ``rank`` rows of A, columns of B (and both of R) where it has more, zero-padded where it
    has fewer (the padding adds nothing to ``B A``); any other tensor as it is. The rank
    dimension is the factor's layout (``nn.Linear.weight``: A is r x n, B is m x r)."""
    part = part_of(key, frozenset())
    axes = {"A": (0,), "B": (1,), "R": (0, 1)}.get(part, ())
    for axis in axes:
        have = tensor.shape[axis]
        if have > rank:
            tensor = tensor.narrow(axis, 0, rank).contiguous()
        elif have < rank:
            shape = list(tensor.shape)
            shape[axis] = rank - have
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)
    return tensor


def state_at_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """``at_rank`` of every tensor of ``state`` (tensors already at ``rank`` are not copied)."""
    return {key: at_rank(key, tensor, rank) for key, tensor in state.items()}


def same_model_at_rank(state: dict[str, torch.Tensor], rank: int) -> bool:
    """Whether ``state_at_rank(state, rank)`` is the model ``state`` is: every adapted layer's
    slices beyond ``rank`` add nothing to its update (B's columns or A's rows beyond ``rank``
    all zero; R beyond its top-left ``rank`` x ``rank`` block all zero). True at round 0
    (B = 0), for a method whose clients start fresh adapters each round, and at the largest
    rank; the server then scores a rank tier as the global model instead of evaluating the same
    function again."""
    for layer in layer_names(state):
        B, A = state[factor_key(layer, "B")], state[factor_key(layer, "A")]
        R = state.get(factor_key(layer, "R"))
        if R is not None:
            if (R[rank:, :].any() or R[:, rank:].any()) and B.any() and A.any():
                return False
            continue
        if B[:, rank:].any() and A[rank:, :].any():
            return False
    return True


RESIDUAL_FACTORS = ("", "_B", "_A")  # dense m x n, or the stacked factors B (m x q), A (q x n)


def residual_key(layer: str, factor: str = "") -> str:
    """The message key of FedEx-LoRA's residual for ``layer``'s base weight."""
    return f"{layer}.base.residual{factor}"


def split_residual_key(key: str) -> tuple[str, str] | None:
    """``(layer, factor)`` of a residual key ('' dense, '_B' or '_A' factored), else None."""
    layer, marker, factor = key.rpartition(".base.residual")
    if marker and factor in RESIDUAL_FACTORS:
        return layer, factor
    return None


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
