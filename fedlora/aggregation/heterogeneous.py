"""Aggregation maths for clients of different LoRA ranks: pure functions, tensors in and out.

Client k holds ``B_k`` (m x r_k), ``A_k`` (r_k x n) and scale ``s_k`` (alpha / r_k), so its
update is ``s_k B_k A_k``; the round's weights are ``w_k``. Every function computes in float64
and never forms an m x n matrix (a client adapter's rank is small, m and n are not):

* FLoRA (Wang et al., NeurIPS 2024): :func:`stacked_factors`, whose product is
  ``sum_k w_k s_k B_k A_k`` exactly for any mix of ranks;
* FlexLoRA (Bai et al., NeurIPS 2024): :func:`truncated_factors`, the best rank-r
  factorisation of that sum for each client rank r (Eckart-Young), through a QR of the stacked
  factors and an SVD of the small core, as NVFlare's HLoRA aggregator does, instead of the
  official code's dense SVD (the same result, O((m + n) R^2) for R = sum_k r_k);
* HetLoRA (Cho et al., EMNLP 2024): :func:`sparsity_weights` (the Frobenius norm of each
  client's update), :func:`zero_pad` and :func:`truncate` to and from the largest rank, and
  :func:`tail_norm`, the quantity rank self-pruning watches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _checked(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: Sequence[float],
             scales: Sequence[float] | None):
    """Validate K client pairs of any ranks (B_k m x r_k, A_k r_k x n) and upcast to float64."""
    if not (len(Bs) == len(As) == len(weights)) or not Bs:
        raise ValueError(f"need one (B, A, weight) per client, got {len(Bs)} B, {len(As)} A, "
                         f"{len(weights)} weights")
    scales = [1.0] * len(Bs) if scales is None else [float(s) for s in scales]
    if len(scales) != len(Bs):
        raise ValueError(f"need one scale per client, got {len(scales)} for {len(Bs)} clients")
    m, n = Bs[0].shape[0], As[0].shape[-1]
    for k, (B, A) in enumerate(zip(Bs, As)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n \
                or B.shape[1] != A.shape[0]:
            raise ValueError(f"client {k}: B {tuple(B.shape)} and A {tuple(A.shape)} must be "
                             f"{m} x r and r x {n} with the same r")
    weights = [float(w) for w in weights]
    if not all(math.isfinite(v) for v in weights + scales):
        raise ValueError(f"weights and scales must be finite, got {weights} and {scales}")
    return ([B.to(torch.float64) for B in Bs], [A.to(torch.float64) for A in As], weights, scales)


def stacked_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                    weights: Sequence[float], scales: Sequence[float] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: ``B = [w_1 s_1 B_1 ... w_K s_K B_K]`` (m x R) and
    ``A = [A_1; ...; A_K]`` (R x n), R = sum_k r_k, so ``B @ A = sum_k w_k s_k B_k A_k``
    exactly, with no cross terms, whatever the ranks. The weight and scale are folded into B,
    so the stack merges into the base weights at scale 1."""
    Bs, As, weights, scales = _checked(Bs, As, weights, scales)
    return (torch.cat([w * s * B for w, s, B in zip(weights, scales, Bs)], dim=1),
            torch.cat(As, dim=0))


def _thin_svd_of_product(B: torch.Tensor, A: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` with ``B @ A = U diag(S) V^T`` (S descending), from a QR of each factor and
    the SVD of the R x R core, never forming the m x n product."""
    Q_B, R_B = torch.linalg.qr(B)  # m x R', R' x R
    Q_A, R_A = torch.linalg.qr(A.T)  # n x R', R' x R
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.T)
    return Q_B @ U_core, S, Q_A @ Vh_core.T


def truncated_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                      weights: Sequence[float], scales: Sequence[float] | None,
                      ranks: Sequence[int], client_scales: dict[int, float] | None = None
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """FlexLoRA's redistribution: for each rank r in ``ranks``, the factors ``(B_r, A_r)`` of
    the best rank-r approximation of ``dW = sum_k w_k s_k B_k A_k`` (one SVD for all ranks),
    with the singular values split as ``sqrt(S)`` between the two factors (the paper's
    ``B = U sqrt(S)``, ``A = sqrt(S) V^T``) and divided by the scale a client of rank r applies
    (``client_scales[r]``, default 1), so that ``client_scales[r] * B_r @ A_r`` is the
    truncation; and its error ``||dW - truncation||_F``, which by Eckart-Young is the norm of
    the discarded singular values. A rank above rank(dW) is zero-padded."""
    B, A = stacked_factors(Bs, As, weights, scales)
    U, S, V = _thin_svd_of_product(B, A)
    out = {}
    for rank in sorted(set(int(r) for r in ranks)):
        if rank <= 0:
            raise ValueError(f"ranks must be positive, got {rank}")
        keep = min(rank, S.numel())
        root = S[:keep].sqrt()
        scale = (client_scales or {}).get(rank, 1.0)
        B_r = torch.zeros(B.shape[0], rank, dtype=torch.float64)
        A_r = torch.zeros(rank, A.shape[1], dtype=torch.float64)
        B_r[:, :keep] = U[:, :keep] * root / scale
        A_r[:keep] = root[:, None] * V[:, :keep].T
        out[rank] = (B_r, A_r, float(S[keep:].square().sum().sqrt()))
    return out


def update_norms(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                 scales: Sequence[float] | None = None) -> list[float]:
    """``||s_k B_k A_k||_F`` for each client, as ``sqrt(trace((B^T B)(A A^T)))`` (r x r)."""
    Bs, As, _, scales = _checked(Bs, As, [1.0] * len(Bs), scales)
    return [abs(s) * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())
            for B, A, s in zip(Bs, As, scales)]


def sparsity_weights(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                     scales: Sequence[float] | None = None) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation: ``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j
    A_j||_F`` (sample counts do not enter). All-zero updates get equal weights."""
    norms = update_norms(Bs, As, scales)
    total = sum(norms)
    if total == 0.0:
        return [1.0 / len(norms)] * len(norms)
    return [v / total for v in norms]


def zero_pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` (m x r) and ``A`` (r x n) padded with zero columns / rows to ``rank`` >= r: the
    product is unchanged."""
    r = B.shape[1]
    if rank < r or A.shape[0] != r:
        raise ValueError(f"cannot pad rank {r} factors (B {tuple(B.shape)}, A {tuple(A.shape)}) "
                         f"to rank {rank}")
    return (torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1),
            torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0))


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` columns of ``B`` and rows of ``A``: what a client of that rank takes
    from the largest-rank global (HetLoRA's distribution)."""
    if rank > B.shape[1] or rank <= 0:
        raise ValueError(f"cannot truncate rank {B.shape[1]} factors to rank {rank}")
    return B[:, :rank].clone(), A[:rank].clone()


def tail_norm(B: torch.Tensor, A: torch.Tensor, keep: int) -> torch.Tensor:
    """``||B[:, keep:]||_F * ||A[keep:, :]||_F``: HetLoRA's rank self-pruning regulariser on the
    ranks beyond ``keep`` (differentiable: added to the local loss times lambda)."""
    return torch.linalg.norm(B[:, keep:]) * torch.linalg.norm(A[keep:])
