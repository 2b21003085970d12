"""Federated aggregation maths: pure functions, tensors in, tensors out.

Every strategy calls these; none re-implements them. Written by hand because no maintained
library provides LoRA-family aggregation. Notation (docs/algorithms.md): an adapted layer
has frozen ``W0`` (m x n), ``B`` (m x r), ``A`` (r x n), LoRA-SB's ``R`` (r x r); client k has
weight ``w_k``; ``E_w[X] = sum_k w_k X_k``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded():
    """Run the server's small linear algebra on one thread.

    Measured on a 2-core machine with the other core busy: a 384 x 384 float64 SVD took 1.49 s
    with torch's default 2 threads and 0.05 s with 1 (OpenMP threads wait on each other).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_weights(num_examples: Sequence[int]) -> list[float]:
    """FedAvg's weights ``w_k = n_k / sum_j n_j`` over the round's participants."""
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("sample weights need at least one example in total")
    return [n / total for n in num_examples]


def server_step_weights(coefficients: Sequence[float], server_lr: float, normalised: bool
                        ) -> tuple[list[float], float]:
    """The server step on client deltas, ``x <- x + eta * sum_k c_k (x_k - x)``, as a weighted
    sum of values: ``sum_k (eta c_k) x_k + (1 - eta sum_k c_k) x``.

    Written this way every aggregation rule that takes values and weights (a mean of R or B,
    FedEx's and LoRA-FAIR's products ``E_w[B_k A_k]``) applies the delta rule unchanged, with the
    previous global ``x`` as one more "client" (ALGORITHMS.md, "Weighting"; note B sec. 3.3: the
    product methods' ``dW* = B_t A_t + eta sum_k c_k (B_k A_k - B_t A_t)``). Its weight may be
    negative (``eta > 1``). With sample or uniform coefficients and ``eta = 1`` it is exactly 0
    and the result is the plain weighted mean ``sum_k c_k x_k``.

    Args:
        coefficients: ``c_k``: ``n_k / sum n`` (samples), ``1/K`` (uniform) or ``omega_k / N``
            (FedAU, never renormalised).
        server_lr: ``eta``.
        normalised: the ``c_k`` sum to 1 by construction (samples, uniform): the previous
            value's weight is then ``1 - eta`` exactly, free of the rounding in ``sum c_k``.

    Returns:
        ``([eta c_k], 1 - eta sum_k c_k)``: the clients' weights and the previous value's.
    """
    previous = 1.0 - server_lr if normalised else 1.0 - server_lr * math.fsum(coefficients)
    return [server_lr * c for c in coefficients], previous


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


# --------------------------------------------------------------------------------------------
# Product-based methods: FedSVD, LoRA-FAIR, FedEx-LoRA.
#
# Each takes the factors and weights as given (sample weights, or FedAU's unnormalised ones: never
# renormalised here), computes in float64 and returns the inputs' dtype. Only product_mean_residual forms
# an m x n matrix; everything else works on thin (m x r, r x n) factors and r x r cores.


def _client_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                    weights: Sequence[float]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Validate K client pairs (B_k m x r, A_k r x n, one shape for all) and upcast to float64."""
    if not (len(Bs) == len(As) == len(weights)) or not Bs:
        raise ValueError(f"need one (B, A, weight) per client, got {len(Bs)} B, {len(As)} A, "
                         f"{len(weights)} weights")
    m, r = Bs[0].shape if Bs[0].dim() == 2 else (None, None)
    n = As[0].shape[1] if As[0].dim() == 2 else None
    for k, (B, A) in enumerate(zip(Bs, As)):
        if B.dim() != 2 or A.dim() != 2 or tuple(B.shape) != (m, r) or tuple(A.shape) != (r, n):
            raise ValueError(f"client {k}: B {tuple(B.shape)} and A {tuple(A.shape)} do not match "
                             f"client 0's B {tuple(Bs[0].shape)} and A {tuple(As[0].shape)} "
                             f"(B must be m x r, A r x n)")
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    return ([B.to(torch.float64) for B in Bs], [A.to(torch.float64) for A in As], weights)


def _stacked_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[w_1 B_1 ... w_K B_K]`` (m x Kr) and ``[A_1; ...; A_K]`` (Kr x n): their product is
    ``E_w[B_k A_k]`` without forming it."""
    return (torch.cat([w * B for w, B in zip(weights, Bs)], dim=1), torch.cat(list(As), dim=0))


def refactorise_orthonormal(B_bar: torch.Tensor, A_prev: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's re-factorisation of ``B_bar A_prev`` (arXiv 2505.12805; the official code,
    ``seanie12/fed-svd`` ``misc/utils.py::reinit_lora``, takes a thin SVD of the m x n product):
    returns ``(B_new, A_new)`` with ``B_new A_new = B_bar A_prev``, ``A_new`` with orthonormal
    rows (``A_new A_new^T = I_r``) spanning the top-r right singular subspace, and the columns of
    ``B_new`` scaled by the singular values.

    Computed from the thin factors only, never an m x n SVD (ALGORITHMS.md, "FedSVD
    re-factorisation"; note B, sec. 2.4): ``Q_B R_B = qr(B_bar)``, ``Q_A R_A = qr(A_prev^T)``,
    ``U_c S V_c^T = svd(R_B R_A^T)`` (r x r), ``A_new = (Q_A V_c)^T``, ``B_new = Q_B U_c S``.
    Cost O((m + n) r^2 + r^3). For distinct singular values the factors equal the dense SVD's
    up to a sign per component. When ``B_bar A_prev`` has rank below r, the rows of ``A_new``
    belonging to zero singular values stay inside the row space of ``A_prev`` (the dense SVD would
    pick arbitrary ones); the matching columns of ``B_new`` are zero either way.

    Args:
        B_bar: the aggregated B (m x r), ``B_t + sum_k w_k (B_k - B_t)``; the scale ``s = alpha/r``
            is not folded in.
        A_prev: the A that was frozen during the round (r x n), ``r <= min(m, n)``.

    Returns:
        ``(B_new, A_new)`` in the inputs' dtypes, computed in float64. If ``B_bar`` is exactly
        zero (e.g. the round-0 FFA-like state), there is nothing to re-factorise and clones of
        ``(B_bar, A_prev)`` are returned.
    """
    if B_bar.dim() != 2 or A_prev.dim() != 2 or B_bar.shape[1] != A_prev.shape[0]:
        raise ValueError(f"B_bar {tuple(B_bar.shape)} and A_prev {tuple(A_prev.shape)} must be "
                         f"m x r and r x n")
    (m, rank), n = B_bar.shape, A_prev.shape[1]
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(m, n)}: A_new cannot have "
                         f"orthonormal rows")
    if not torch.any(B_bar):
        return B_bar.clone(), A_prev.clone()
    Q_B, R_B = torch.linalg.qr(B_bar.to(torch.float64))            # m x r, r x r
    Q_A, R_A = torch.linalg.qr(A_prev.to(torch.float64).T)         # n x r, r x r
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.T)                   # B_bar A_prev = Q_B C Q_A^T
    A_new = Vh_c @ Q_A.T                                           # (Q_A V_c)^T
    B_new = (Q_B @ U_c) * S
    return B_new.to(B_bar.dtype), A_new.to(A_prev.dtype)


def _product_correction_terms(Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float]):
    """LoRA-FAIR's thin statistics (float64): ``B_bar``, ``A_bar``, ``G = A_bar A_bar^T`` (r x r),
    ``P = dW* A_bar^T`` (m x r) and ``||dW*||_F^2`` with ``dW* = E_w[B_k A_k]``, none via m x n."""
    B_bar, A_bar = weighted_sum(Bs, weights), weighted_sum(As, weights)
    B_stack, A_stack = _stacked_factors(Bs, As, weights)
    gram = A_bar @ A_bar.T
    target_times_A_bar_t = B_stack @ (A_stack @ A_bar.T)
    # ||B_stack A_stack||_F^2 = <B_stack^T B_stack, A_stack A_stack^T>, two Kr x Kr Gram matrices.
    target_sq = torch.sum((B_stack.T @ B_stack) * (A_stack @ A_stack.T)).clamp_min(0.0)
    return B_bar, A_bar, gram, target_times_A_bar_t, target_sq


def _factored_cosine(B: torch.Tensor, target_times_A_bar_t: torch.Tensor, gram: torch.Tensor,
                     target_norm: torch.Tensor) -> torch.Tensor:
    """``cos(dW*, B A_bar)`` from ``<dW*, B A_bar> = <dW* A_bar^T, B>`` and
    ``||B A_bar||_F^2 = <B G, B>``; 0 when either matrix is zero."""
    product_sq = torch.sum((B @ gram) * B).clamp_min(0.0)
    denominator = target_norm * torch.sqrt(product_sq)
    if denominator.item() == 0.0:
        return torch.sum(target_times_A_bar_t * B) * 0.0
    return torch.sum(target_times_A_bar_t * B) / denominator


def factored_product_cosine(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                    weights: Sequence[float], delta_B: torch.Tensor | None = None) -> float:
    """LoRA-FAIR's similarity ``cos(dW*, (B_bar + delta_B) A_bar)`` (arXiv 2411.14961; the
    discrepancy in its residual-correction problem, note B sec. 1.3): the Frobenius cosine, with
    ``dW* = E_w[B_k A_k]``, ``B_bar = E_w[B_k]``, ``A_bar = E_w[A_k]``; ``delta_B = None`` gives
    FedIT's ``cos(dW*, B_bar A_bar)``. Computed from r x r and Kr x Kr products, never an m x n
    matrix; 0 when either matrix is zero. For logging and tests."""
    Bs, As, weights = _client_factors(Bs, As, weights)
    B_bar, _, gram, target_times_A_bar_t, target_sq = _product_correction_terms(Bs, As, weights)
    corrected = B_bar if delta_B is None else B_bar + delta_B.to(torch.float64)
    return _factored_cosine(corrected, target_times_A_bar_t, gram, torch.sqrt(target_sq)).item()


def product_correction_ls(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                           weights: Sequence[float], lam: float) -> torch.Tensor:
    """LoRA-FAIR's correction of B, closed-form variant (``lorafair.objective=ls``).

    LoRA-FAIR (arXiv 2411.14961; note B sec. 1.3) corrects FedIT's ``B_bar = E_w[B_k]`` by
    ``delta_B`` so that ``(B_bar + delta_B) A_bar`` approaches the ideal update
    ``dW* = E_w[B_k A_k]``, with ``A_bar = E_w[A_k]`` kept. This variant replaces the paper's
    cosine discrepancy by the squared Frobenius error and its regulariser by ``lam ||D||_F^2``
    (note B, sec. 1.4):

        min_D ||dW* - (B_bar + D) A_bar||_F^2 + lam ||D||_F^2
        =>  D = (dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I_r)^{-1},

    with ``dW* A_bar^T = sum_k w_k B_k (A_k A_bar^T)``, so no m x n matrix is formed (cost
    O((m + n) K r^2 + r^3)). ``lam = 0`` gives the least-squares projection through the
    pseudo-inverse of ``A_bar A_bar^T`` (the minimum-norm solution if ``A_bar`` is rank-deficient).

    Args:
        Bs, As: the clients' factors, ``B_k`` m x r and ``A_k`` r x n.
        weights: ``w_k`` as given (sample weights, or FedAU's); never renormalised.
        lam: ridge ``lam >= 0`` on ``||D||_F^2``, absolute (``A_bar A_bar^T`` is about ``I/3`` for
            PEFT's Kaiming-uniform A, so 0.01 is a ~3 % ridge).

    Returns:
        ``delta_B`` (m x r) in the dtype of ``Bs[0]``; the server broadcasts
        ``(A_bar, B_bar + delta_B)`` and never changes ``W0``.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    out_dtype = Bs[0].dtype if Bs else torch.float64
    Bs, As, weights = _client_factors(Bs, As, weights)
    B_bar, _, gram, target_times_A_bar_t, _ = _product_correction_terms(Bs, As, weights)
    rhs = target_times_A_bar_t - B_bar @ gram                       # (dW* - B_bar A_bar) A_bar^T
    if lam == 0:
        delta_B = rhs @ torch.linalg.pinv(gram, hermitian=True)
    else:
        system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        delta_B = torch.linalg.solve(system, rhs.T).T               # system is symmetric
    return delta_B.to(out_dtype)


def product_correction_cos(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                            weights: Sequence[float], lam: float = 0.01, steps: int = 200,
                            lr: float | None = None) -> torch.Tensor:
    """LoRA-FAIR's correction of B, paper-faithful variant (``lorafair.objective=cos``).

    LoRA-FAIR (arXiv 2411.14961; its residual-correction problem, note B sec. 1.3) solves on
    the server

        delta_B = argmin_D  1 - cos(dW*, (B_bar + D) A_bar) + lam ||D||_F

    from ``D = 0``, with ``dW* = E_w[B_k A_k]``, ``B_bar = E_w[B_k]``, ``A_bar = E_w[A_k]`` and the
    Frobenius cosine; the paper uses lam = 0.01 and an iterative solver whose steps and learning
    rate it does not give. fedlora's choices (documented, not the paper's):

    - Adam (``torch.optim.Adam``, default betas/eps) on a float64 ``D`` from 0, ``steps = 200``.
    - ``lr = None`` means ``1e-2 * rms(B_bar)`` (root-mean-square entry of ``B_bar``; 1e-3 if
      ``B_bar = 0``): Adam moves each entry by about ``lr`` per step, and the cosine is
      scale-invariant, so a step relative to B's own scale behaves the same for B of size 1e-3
      or 1. Pass a float for an absolute learning rate.
    - ``||D||_F`` is not differentiable at 0. First, ``D = 0`` is returned outright when it is
      already stationary, i.e. ``||grad_D (1 - cos)(0)||_F <= lam`` (then 0 is in the
      subdifferential; this makes identical clients give exactly 0). Otherwise Adam minimises
      the smoothed ``lam * (sqrt(||D||_F^2 + eta^2) - eta)`` with ``eta = 1e-12 ||B_bar||_F``,
      which differs from ``lam ||D||_F`` by at most ``lam * eta`` and has gradient 0 at D = 0.
    - The iterate with the lowest exact objective (``D = 0`` included) is returned, so the result
      never scores worse than FedIT's ``B_bar``: objective(delta_B) <= objective(0), hence
      ``cos(dW*, (B_bar + delta_B) A_bar) >= cos(dW*, B_bar A_bar)``.

    The cosine comes from thin factors (see ``factored_product_cosine``): each step costs O(m r^2),
    never an m x n matrix. If ``dW* = 0`` there is nothing to align to and 0 is returned.

    Args:
        Bs, As: the clients' factors, ``B_k`` m x r and ``A_k`` r x n.
        weights: ``w_k`` as given (sample weights, or FedAU's); never renormalised.
        lam: weight ``>= 0`` of ``||D||_F`` (paper: 0.01).
        steps: Adam steps (``>= 0``).
        lr: Adam learning rate; ``None`` for the relative default above.

    Returns:
        ``delta_B`` (m x r) in the dtype of ``Bs[0]``.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0 or None, got {lr}")
    out_dtype = Bs[0].dtype if Bs else torch.float64
    # The server may aggregate under no_grad / inference_mode; the inner optimisation needs
    # autograd and tensors that are not inference tensors.
    with torch.inference_mode(False), torch.enable_grad():
        Bs, As, weights = _client_factors([B.clone() for B in Bs], [A.clone() for A in As],
                                          weights)
        B_bar, _, gram, target_times_A_bar_t, target_sq = _product_correction_terms(Bs, As, weights)
        delta_B = torch.zeros_like(B_bar, requires_grad=True)
        if target_sq.item() == 0.0 or steps == 0:
            return delta_B.detach().to(out_dtype)
        target_norm = torch.sqrt(target_sq)
        B_bar_norm = torch.linalg.matrix_norm(B_bar).item()
        eta = 1e-12 * B_bar_norm if B_bar_norm > 0 else 1e-12
        if lr is None:
            lr = 1e-2 * B_bar_norm / math.sqrt(B_bar.numel()) if B_bar_norm > 0 else 1e-3

        def objective(D: torch.Tensor, smooth: bool) -> torch.Tensor:
            cos = _factored_cosine(B_bar + D, target_times_A_bar_t, gram, target_norm)
            sq = torch.sum(D * D)
            penalty = torch.sqrt(sq + eta ** 2) - eta if smooth else torch.sqrt(sq)
            return 1.0 - cos + lam * penalty

        # Optimality of D = 0: 0 in grad(1 - cos)(0) + lam * (unit ball).
        mismatch = 1.0 - _factored_cosine(B_bar + delta_B, target_times_A_bar_t, gram,
                                          target_norm)
        (grad_at_zero,) = torch.autograd.grad(mismatch, delta_B)
        if torch.linalg.matrix_norm(grad_at_zero).item() <= lam:
            return delta_B.detach().to(out_dtype)

        best_value, best = mismatch.item(), delta_B.detach().clone()
        optimiser = torch.optim.Adam([delta_B], lr=lr)
        for _ in range(int(steps)):
            optimiser.zero_grad()
            objective(delta_B, smooth=True).backward()
            optimiser.step()
            with torch.no_grad():
                value = objective(delta_B, smooth=False).item()
            if value < best_value:
                best_value, best = value, delta_B.detach().clone()
    return best.to(out_dtype)


def product_mean_residual_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                           weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedEx-LoRA's residual in factored form (arXiv 2410.09432; ``fedex.residual=factored``,
    ALGORITHMS.md): ``(B_stack, A_stack)`` with

        B_stack = [w_1 B_1, ..., w_K B_K, -B_bar]      (m x (K+1) r)
        A_stack = [A_1; ...; A_K; A_bar]               ((K+1) r x n)

    so that ``B_stack @ A_stack = E_w[B_k A_k] - B_bar A_bar = product_mean_residual(...)``. Shipping
    these costs (K+1) r (m + n) elements per matrix instead of m n; a client adds
    ``s * B_stack @ A_stack`` to ``W0`` in its own layout. Weights as given, never renormalised.
    Returned in the dtypes of ``Bs[0]`` and ``As[0]``.
    """
    B_dtype, A_dtype = (Bs[0].dtype, As[0].dtype) if Bs and As else (torch.float64,) * 2
    Bs, As, weights = _client_factors(Bs, As, weights)
    B_stack, A_stack = _stacked_factors(Bs, As, weights)
    B_bar, A_bar = weighted_sum(Bs, weights), weighted_sum(As, weights)
    return (torch.cat([B_stack, -B_bar], dim=1).to(B_dtype),
            torch.cat([A_stack, A_bar], dim=0).to(A_dtype))


def product_mean_residual(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                   weights: Sequence[float]) -> torch.Tensor:
    """FedEx-LoRA's residual ``E_w[B_k A_k] - B_bar A_bar`` (arXiv 2410.09432; official
    ``fed_agg.py::aggregate_models_ours``), dense m x n (``fedex.residual=dense``, the official
    behaviour).

    The server sets ``W0 <- W0 + s * residual`` (``s = alpha / r``) on every client and the adapter
    to ``(B_bar, A_bar)``, so ``W0' + s B_bar A_bar = W0 + s E_w[B_k A_k]`` exactly. The residual is
    added in ``W0``'s own layout: both are m x n for ``nn.Linear`` (the official FedEx repository
    transposes it, which is right only for GPT-2's ``Conv1D``). Rank <= K r (<= (K-1) r when
    the weights sum to 1, as it is then ``E_w[(B_k - B_bar)(A_k - A_bar)]``); zero for one client
    or identical clients when the weights sum to 1. Weights as given, never renormalised;
    computed in float64 as one m x (K+1)r by (K+1)r x n product, returned in the promoted dtype
    of ``Bs[0]`` and ``As[0]``.
    """
    out_dtype = torch.promote_types(Bs[0].dtype, As[0].dtype) if Bs and As else torch.float64
    B_stack, A_stack = product_mean_residual_factors([B.to(torch.float64) for B in Bs],
                                              [A.to(torch.float64) for A in As], weights)
    return (B_stack @ A_stack).to(out_dtype)
