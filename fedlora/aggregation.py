"""Federated aggregation maths: pure functions, tensors in, tensors out.

Every strategy calls these; none re-implements them. Written by hand because no maintained
library provides LoRA-family aggregation. Notation (../shared/ALGORITHMS.md): an adapted layer
has frozen ``W0`` (m x n), ``B`` (m x r), ``A`` (r x n), LoRA-SB's ``R`` (r x r); client k has
weight ``w_k``; ``E_w[X] = sum_k w_k X_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def sample_weights(num_examples: Sequence[int]) -> list[float]:
    """FedAvg's weights ``w_k = n_k / sum_j n_j`` over the round's participants."""
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("sample weights need at least one example in total")
    return [n / total for n in num_examples]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k X_k``, accumulated in the tensors' own dtype (float64 in exactness tests)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor, got {len(tensors)} tensors, {len(weights)} weights")
    out = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor, alpha=float(weight))
    return out


def weighted_mean_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                         keys=None) -> dict[str, torch.Tensor]:
    """Key-wise ``E_w[X]`` over client state dicts (FedIT for A, B; Fed-SB for R; the head)."""
    keys = list(states[0]) if keys is None else list(keys)
    return {key: weighted_sum([s[key] for s in states], weights) for key in keys}


def product_gap(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                weights: Sequence[float]) -> torch.Tensor:
    """FedIT's aggregation error ``E_w[B_k A_k] - E_w[B_k] E_w[A_k]`` (zero iff exact)."""
    ideal = weighted_sum([B @ A for B, A in zip(Bs, As)], weights)
    return ideal - weighted_sum(Bs, weights) @ weighted_sum(As, weights)


def lora_sb_init(grad_sum: torch.Tensor, rank: int, step_size: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB's initialisation from the summed first gradient of a base weight (m x n).

    The first full fine-tuning step is approximated as an Adam first step,
    ``D = -step_size * sign(G)`` (LoRA-SB, arXiv 2411.19557, sec. 4), and its best rank-r
    approximation ``D_r = U_r S_r V_r^T`` gives ``B = U_r`` (orthonormal columns),
    ``R = diag(S_r)`` and ``A = V_r^T`` (orthonormal rows), so ``B R A = D_r`` with scale 1.
    An exact SVD (float64) instead of the official randomized one: deterministic and optimal.
    """
    if rank > min(grad_sum.shape):
        raise ValueError(f"rank {rank} exceeds min{tuple(grad_sum.shape)}")
    step = -step_size * torch.sign(grad_sum.to(torch.float64))
    U, S, Vh = torch.linalg.svd(step, full_matrices=False)
    return U[:, :rank].clone(), torch.diag(S[:rank]), Vh[:rank].clone()
