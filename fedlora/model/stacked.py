"""Several clients' adapters on one copy of the base model: stacked factors, one pass.

In a batched local round (``client_batch`` > 1, ``fedlora.clients.batched``) the rows of K
clients go through the model together, client k's rows forming block k of the batch (every
block has the same number of rows). Each adapted layer computes, for the rows of client k::

    y = W0 x + b + s * B_k [R_k] (A_k x)

with one matmul for the base (all rows) and grouped matmuls over the client index for the
adapter terms: ``A`` is stacked ``[K, r, n]``, ``R`` ``[K, r, r]``, ``B`` ``[K, m, r]``. A trained
head (a classifier's new ``nn.Linear``) is stacked the same way, ``[K, out, in]`` and ``[K, out]``.

``stacked_clients`` swaps these modules in for the model's ``LoRALinear`` layers and head
Linears for the duration of a block, and back afterwards (the model is shared by every client
of a process).

Layer 4 (model): imports only the adapters module.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fedlora.model.adapters import LoRALinear, factor_key


class StackedLoRALinear(nn.Module):
    """One adapted layer with K clients' factors: block k of the rows uses client k's."""

    def __init__(self, layer: LoRALinear, A: torch.Tensor, B: torch.Tensor,
                 R: torch.Tensor | None):
        super().__init__()
        self.base = layer.base
        self.scale = layer.scale
        self.A, self.B, self.R = A, B, R
        self.clients = A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = x.reshape(self.clients, -1, x.shape[-1])  # [K, rows of a client x positions, n]
        hidden = torch.matmul(rows, self.A.transpose(1, 2))
        if self.R is not None:
            hidden = torch.matmul(hidden, self.R.transpose(1, 2))
        delta = torch.matmul(hidden, self.B.transpose(1, 2))
        return out + self.scale * delta.reshape(out.shape)


class StackedLinear(nn.Module):
    """A Linear with K clients' weights and biases: block k of the rows uses client k's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.clients = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(self.clients, -1, x.shape[-1])
        if self.bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:  # baddbmm: what F.linear computes with a bias (also under autocast)
            out = torch.baddbmm(self.bias.unsqueeze(1), rows, self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.weight.shape[1])


def head_linears(model: nn.Module, head_keys) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose parameters are head keys (module path -> module); a head
    key of any other kind of module is a ``ValueError`` (it cannot be stacked)."""
    linears = {}
    for key in head_keys:
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path)
        if not isinstance(module, nn.Linear) or name not in ("weight", "bias"):
            raise ValueError(f"the head parameter '{key}' is not an nn.Linear's weight or bias: "
                             "heads of other kinds cannot be trained for several clients at once")
        linears[module_path] = module
    return linears


def stacked_keys(model: nn.Module, head_keys) -> dict[str, tuple[str, str]]:
    """Every adapter and head state key -> (module path, what it is in the stacked module:
    'A', 'B', 'R', 'weight' or 'bias')."""
    keys = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for part in ("A", "B") + (("R",) if module.lora_R is not None else ()):
                keys[factor_key(path, part)] = (path, part)
    for path, module in head_linears(model, head_keys).items():
        keys[f"{path}.weight"] = (path, "weight")
        if f"{path}.bias" in head_keys:
            keys[f"{path}.bias"] = (path, "bias")
    return keys


@contextmanager
def stacked_clients(model: nn.Module, head_keys, stacks: dict[str, torch.Tensor]):
    """The model with every adapted layer and head Linear computing K clients at once from
    ``stacks`` (state key -> that tensor of each client stacked on a first dimension of size K,
    for every key ``stacked_keys`` names); the model's own modules come back afterwards."""
    keys = stacked_keys(model, head_keys)
    missing = set(keys) - set(stacks)
    if missing:
        raise KeyError(f"no stacked value for {sorted(missing)[:3]}")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, (path, what) in keys.items():
        by_module.setdefault(path, {})[what] = stacks[key]
    swapped = []
    try:
        for path, tensors in by_module.items():
            original = model.get_submodule(path)
            if isinstance(original, LoRALinear):
                replacement = StackedLoRALinear(original, tensors["A"], tensors["B"], tensors.get("R"))
            else:  # a frozen bias (not a head key) is every client's
                bias = tensors.get("bias")
                if bias is None and original.bias is not None:
                    bias = original.bias.expand(tensors["weight"].shape[0], -1)
                replacement = StackedLinear(tensors["weight"], bias)
            _set_submodule(model, path, replacement)
            swapped.append((path, original))
        yield model
    finally:
        for path, original in reversed(swapped):
            _set_submodule(model, path, original)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
