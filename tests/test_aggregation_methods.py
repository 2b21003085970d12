"""Product-based aggregation maths: FedSVD, LoRA-FAIR, FedEx-LoRA (fedlora.aggregation.maths).

ALGORITHMS.md, "Invariants" 3 (FedEx exact), 4 (FedSVD), 5 (LoRA-FAIR), 9 (equal sizes give the
official unweighted aggregation); note B, "Test invariants" 1-10. float64 throughout; every fast
function is also compared with a slow, obvious dense implementation (m x n matrices, dense SVD)
on random shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation.maths import (product_mean_residual, product_mean_residual_factors, refactorise_orthonormal,
                                       product_correction_cos, product_correction_ls, factored_product_cosine)

F64 = torch.float64


def random_weights(generator: torch.Generator, count: int) -> list[float]:
    """Positive, non-uniform weights summing to 1 (up to rounding), as sample weights are."""
    raw = torch.rand(count, generator=generator, dtype=F64) + 0.1
    return (raw / raw.sum()).tolist()


def random_clients(generator: torch.Generator, m: int, n: int, rank: int, num_clients: int,
                   B_scale: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Independent Gaussian client factors B_k (m x r, entries of size B_scale), A_k (r x n)."""
    Bs = [B_scale * torch.randn(m, rank, generator=generator, dtype=F64)
          for _ in range(num_clients)]
    As = [torch.randn(rank, n, generator=generator, dtype=F64) for _ in range(num_clients)]
    return Bs, As


def lora_like_clients(generator: torch.Generator, m: int, n: int, rank: int, num_clients: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clients that drifted from one shared start: PEFT-like A (U(+-1/sqrt n)) and small B, the
    regime in which LoRA-FAIR's lam = 0.01 leaves room for a non-zero correction."""
    A0 = (torch.rand(rank, n, generator=generator, dtype=F64) * 2 - 1) / math.sqrt(n)
    B0 = 1e-2 * torch.randn(m, rank, generator=generator, dtype=F64)
    As = [A0 + 0.5 * (torch.rand(rank, n, generator=generator, dtype=F64) * 2 - 1) / math.sqrt(n)
          for _ in range(num_clients)]
    Bs = [B0 + 5e-3 * torch.randn(m, rank, generator=generator, dtype=F64)
          for _ in range(num_clients)]
    return Bs, As


def max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item()


def fro(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x).item()


# Slow, obvious dense implementations (they form m x n matrices on purpose).


def dense_target(Bs, As, weights) -> torch.Tensor:
    """dW* = sum_k w_k B_k A_k, one client at a time."""
    total = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=F64)
    for w, B, A in zip(weights, Bs, As):
        total += w * (B @ A)
    return total


def dense_means(Bs, As, weights) -> tuple[torch.Tensor, torch.Tensor]:
    return sum(w * B for w, B in zip(weights, Bs)), sum(w * A for w, A in zip(weights, As))


def dense_ls_correction(Bs, As, weights, lam) -> torch.Tensor:
    """argmin_D ||dW* - (B_bar + D) A_bar||_F^2 + lam ||D||_F^2 by torch.linalg.lstsq on the
    dense problem: the rows of D solve [A_bar^T; sqrt(lam) I] D^T = [(dW* - B_bar A_bar)^T; 0]
    (gelsd: the minimum-norm solution when lam = 0 and A_bar is rank-deficient)."""
    B_bar, A_bar = dense_means(Bs, As, weights)
    gap = dense_target(Bs, As, weights) - B_bar @ A_bar
    rank = A_bar.shape[0]
    system = torch.cat([A_bar.T, math.sqrt(lam) * torch.eye(rank, dtype=F64)])
    rhs = torch.cat([gap.T, torch.zeros(rank, gap.shape[0], dtype=F64)])
    return torch.linalg.lstsq(system, rhs, driver="gelsd").solution.T


def dense_cosine(X: torch.Tensor, Y: torch.Tensor) -> float:
    return (torch.sum(X * Y) / (torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(Y))).item()


def dense_fair_objective(Bs, As, weights, delta_B, lam) -> float:
    """1 - cos(dW*, (B_bar + D) A_bar) + lam ||D||_F, densely."""
    B_bar, A_bar = dense_means(Bs, As, weights)
    return (1.0 - dense_cosine(dense_target(Bs, As, weights), (B_bar + delta_B) @ A_bar)
            + lam * fro(delta_B))


def dense_svd_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official FedSVD route: thin SVD of the m x n product, B = U_r S_r, A = V_r^T."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def with_spectrum(generator: torch.Generator, m: int, n: int, singular_values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_bar, A_prev) whose product has exactly the given singular values, with a
    non-orthonormal A_prev (an invertible r x r mixing T moves between the two factors)."""
    rank = singular_values.numel()
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=F64))
    Q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=F64))
    T = Q * (0.5 + 1.5 * torch.rand(rank, generator=generator, dtype=F64))  # cond(T) <= 4
    return (U * singular_values) @ torch.linalg.inv(T), T @ V.T


# --------------------------------------------------------------------------------------------
# FedSVD: B_new A_new = B_bar A_prev with A_new A_new^T = I_r, from thin factors only


@pytest.mark.parametrize("m,n,rank", [(48, 40, 4), (40, 48, 4), (30, 30, 6), (7, 50, 7)])
def test_fedsvd_keeps_product_and_orthonormalises_A(m, n, rank):
    # Prepare
    gen = torch.Generator().manual_seed(100 + m + n + rank)
    B_bar = torch.randn(m, rank, generator=gen, dtype=F64)
    A_prev = torch.randn(rank, n, generator=gen, dtype=F64)
    product = B_bar @ A_prev

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    assert B_new.shape == (m, rank) and A_new.shape == (rank, n)
    assert B_new.dtype == A_new.dtype == F64
    assert max_abs(A_new @ A_new.T - torch.eye(rank, dtype=F64)) <= 1e-10
    assert fro(B_new @ A_new - product) <= 1e-10 * fro(product)
    # A_prev was not orthonormal, so the check above is not vacuous.
    assert max_abs(A_prev @ A_prev.T - torch.eye(rank, dtype=F64)) > 0.5


def test_fedsvd_singular_values_equal_dense_svd():
    # Prepare
    gen = torch.Generator().manual_seed(101)
    B_bar = torch.randn(48, 4, generator=gen, dtype=F64)
    A_prev = torch.randn(4, 40, generator=gen, dtype=F64)
    expected = torch.linalg.svdvals(B_bar @ A_prev)[:4]

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert: B_new's column norms are the singular values, sorted, as in B = U S
    column_norms = torch.linalg.vector_norm(B_new, dim=0)
    assert max_abs(torch.linalg.svdvals(B_new @ A_new)[:4] - expected) <= 1e-10 * expected[0]
    assert max_abs(column_norms - expected) <= 1e-10 * expected[0]
    assert (column_norms[:-1] >= column_norms[1:]).all()
    # B_new's columns are orthogonal: B_new^T B_new = S^2
    assert max_abs(B_new.T @ B_new - torch.diag(expected ** 2)) <= 1e-10 * expected[0] ** 2


def test_fedsvd_matches_dense_svd_up_to_sign_for_distinct_singular_values():
    # Prepare
    gen = torch.Generator().manual_seed(102)
    B_bar, A_prev = with_spectrum(gen, 48, 40, torch.tensor([5.0, 3.0, 2.0, 0.5], dtype=F64))
    B_dense, A_dense = dense_svd_factors(B_bar @ A_prev, 4)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    signs = torch.sign(torch.sum(A_new * A_dense, dim=1))
    assert max_abs(A_new * signs[:, None] - A_dense) <= 1e-10
    assert max_abs(B_new * signs - B_dense) <= 1e-10


def test_fedsvd_rank_one_B_bar_keeps_A_in_previous_row_space():
    # Prepare: B_bar = u v^T has rank 1, so B_bar A_prev has one non-zero singular value
    gen = torch.Generator().manual_seed(103)
    m, n, rank = 48, 40, 4
    u = torch.randn(m, 1, generator=gen, dtype=F64)
    v = torch.randn(1, rank, generator=gen, dtype=F64)
    B_bar = u @ v
    A_prev = torch.randn(rank, n, generator=gen, dtype=F64)
    Q_prev, _ = torch.linalg.qr(A_prev.T)  # orthonormal basis of A_prev's row space
    scale = fro(B_bar @ A_prev)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    assert max_abs(B_new[:, 1:]) <= 1e-12 * scale
    assert fro(B_new[:, :1]) == pytest.approx(scale, rel=1e-12)
    rows = A_new[1:]
    assert max_abs(rows.T - Q_prev @ (Q_prev.T @ rows.T)) <= 1e-12
    assert max_abs(A_new @ A_new.T - torch.eye(rank, dtype=F64)) <= 1e-10
    assert fro(B_new @ A_new - B_bar @ A_prev) <= 1e-10 * scale
    # The projection test can fail: a random unit vector is far from a 4-dim subspace of R^40.
    probe = torch.randn(n, 1, generator=gen, dtype=F64)
    assert fro(probe - Q_prev @ (Q_prev.T @ probe)) > 0.5 * fro(probe)


def test_fedsvd_zero_B_bar_returns_inputs_unchanged():
    # Prepare
    gen = torch.Generator().manual_seed(104)
    B_bar = torch.zeros(48, 4, dtype=F64)
    A_prev = torch.randn(4, 40, generator=gen, dtype=F64)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    assert torch.equal(B_new, B_bar) and torch.equal(A_new, A_prev)
    assert B_new is not B_bar and A_new is not A_prev
    assert B_new.data_ptr() != B_bar.data_ptr() and A_new.data_ptr() != A_prev.data_ptr()


def test_fedsvd_is_idempotent_up_to_sign():
    # Prepare
    gen = torch.Generator().manual_seed(105)
    B_bar, A_prev = with_spectrum(gen, 30, 20, torch.tensor([4.0, 2.0, 1.0], dtype=F64))

    # Execute
    B_once, A_once = refactorise_orthonormal(B_bar, A_prev)
    B_twice, A_twice = refactorise_orthonormal(B_once, A_once)

    # Assert
    signs = torch.sign(torch.sum(A_once * A_twice, dim=1))
    assert max_abs(A_twice * signs[:, None] - A_once) <= 1e-10
    assert max_abs(B_twice * signs - B_once) <= 1e-10


def test_fedsvd_float32_keeps_dtype_and_product():
    # Prepare
    gen = torch.Generator().manual_seed(106)
    B_bar = torch.randn(48, 4, generator=gen)
    A_prev = torch.randn(4, 40, generator=gen)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    assert B_new.dtype == A_new.dtype == torch.float32
    assert fro(B_new @ A_new - B_bar @ A_prev) <= 1e-5 * fro(B_bar @ A_prev)
    assert max_abs(A_new @ A_new.T - torch.eye(4)) <= 1e-5


@pytest.mark.parametrize("B_shape,A_shape,message", [
    ((48, 4), (3, 40), "must be m x r and r x n"),
    ((48,), (4, 40), "must be m x r and r x n"),
    ((48, 6), (6, 5), "rank 6 exceeds min"),
    ((3, 4), (4, 40), "rank 4 exceeds min"),
])
def test_fedsvd_rejects_bad_shapes(B_shape, A_shape, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        refactorise_orthonormal(torch.ones(B_shape, dtype=F64), torch.ones(A_shape, dtype=F64))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_fedsvd_matches_dense_svd_property(m, n, data, seed):
    # Prepare
    rank = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(seed)
    B_bar = torch.randn(m, rank, generator=gen, dtype=F64)
    A_prev = torch.randn(rank, n, generator=gen, dtype=F64)
    product = B_bar @ A_prev
    expected = torch.linalg.svdvals(product)[:rank]
    B_dense, A_dense = dense_svd_factors(product, rank)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert: same product as the dense route, same spectrum, orthonormal rows
    assert max_abs(A_new @ A_new.T - torch.eye(rank, dtype=F64)) <= 1e-10
    assert fro(B_new @ A_new - product) <= 1e-10 * fro(product)
    assert fro(B_new @ A_new - B_dense @ A_dense) <= 1e-10 * fro(product)
    assert max_abs(torch.linalg.vector_norm(B_new, dim=0) - expected) <= 1e-10 * expected[0]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_fedsvd_factors_match_dense_svd_up_to_sign_property(m, n, data, seed):
    # Prepare: distinct singular values 10 * 2^-i, so the dense factors are unique up to sign
    rank = data.draw(st.integers(1, min(m, n, 6)))
    gen = torch.Generator().manual_seed(seed)
    spectrum = 10.0 * 0.5 ** torch.arange(rank, dtype=F64)
    B_bar, A_prev = with_spectrum(gen, m, n, spectrum)
    B_dense, A_dense = dense_svd_factors(B_bar @ A_prev, rank)

    # Execute
    B_new, A_new = refactorise_orthonormal(B_bar, A_prev)

    # Assert
    signs = torch.sign(torch.sum(A_new * A_dense, dim=1))
    assert max_abs(A_new * signs[:, None] - A_dense) <= 1e-9
    assert max_abs(B_new * signs - B_dense) <= 1e-9
    assert max_abs(torch.linalg.vector_norm(B_new, dim=0) - spectrum) <= 1e-10 * spectrum[0]


# --------------------------------------------------------------------------------------------
# LoRA-FAIR, closed form: D = (dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^{-1}


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0, 100.0])
def test_lorafair_ls_matches_dense_oracle(lam):
    # Prepare
    gen = torch.Generator().manual_seed(200)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    expected = dense_ls_correction(Bs, As, weights, lam)

    # Execute
    delta_B = product_correction_ls(Bs, As, weights, lam)

    # Assert
    assert delta_B.shape == (48, 4) and delta_B.dtype == F64
    assert max_abs(delta_B - expected) <= 1e-10 * max(1.0, max_abs(expected))
    assert fro(expected) > 1e-3  # not vacuous


@pytest.mark.parametrize("lam", [0.0, 1e-12])
def test_lorafair_ls_small_lambda_solves_normal_equations(lam):
    # Prepare: lam = 1e-12 is tiny next to A_bar A_bar^T (entries of order n = 40)
    gen = torch.Generator().manual_seed(201)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    target = dense_target(Bs, As, weights)
    B_bar, A_bar = dense_means(Bs, As, weights)

    # Execute
    delta_B = product_correction_ls(Bs, As, weights, lam)

    # Assert: the corrected residual is orthogonal to A_bar's row space
    residual = target - (B_bar + delta_B) @ A_bar
    assert max_abs(residual @ A_bar.T) <= 1e-10 * fro(target) * fro(A_bar)
    assert max_abs((target - B_bar @ A_bar) @ A_bar.T) > 1.0  # FedIT's is not


def test_lorafair_ls_zero_lambda_is_minimum_norm_for_rank_deficient_A_bar():
    # Prepare: every A_k's rows lie in one 3-dim subspace, so A_bar A_bar^T (4 x 4) is singular
    gen = torch.Generator().manual_seed(202)
    basis = torch.randn(3, 40, generator=gen, dtype=F64)
    As = [torch.randn(4, 3, generator=gen, dtype=F64) @ basis for _ in range(3)]
    Bs = [torch.randn(48, 4, generator=gen, dtype=F64) for _ in range(3)]
    weights = random_weights(gen, 3)
    _, A_bar = dense_means(Bs, As, weights)

    # Execute
    delta_B = product_correction_ls(Bs, As, weights, 0.0)

    # Assert
    assert torch.linalg.matrix_rank(A_bar @ A_bar.T).item() == 3
    assert torch.isfinite(delta_B).all()
    expected = dense_ls_correction(Bs, As, weights, 0.0)  # lstsq (gelsd): the minimum norm
    assert max_abs(delta_B - expected) <= 1e-9 * max(1.0, max_abs(expected))


def test_lorafair_ls_never_worse_than_fedit_and_shrinks_with_lambda():
    # Prepare
    gen = torch.Generator().manual_seed(203)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    target = dense_target(Bs, As, weights)
    B_bar, A_bar = dense_means(Bs, As, weights)
    fedit_error = fro(target - B_bar @ A_bar)
    lams = [0.0, 0.01, 1.0, 100.0, 1e4]

    # Execute
    corrections = [product_correction_ls(Bs, As, weights, lam) for lam in lams]

    # Assert
    errors = [fro(target - (B_bar + D) @ A_bar) for D in corrections]
    norms = [fro(D) for D in corrections]
    assert all(error <= fedit_error for error in errors)
    assert errors[0] < 0.99 * fedit_error  # the correction does something
    assert all(a >= b for a, b in zip(norms, norms[1:]))
    assert norms[0] > 10 * norms[-1]


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_lorafair_ls_identical_clients_give_zero(lam):
    # Prepare
    gen = torch.Generator().manual_seed(204)
    B = torch.randn(48, 4, generator=gen, dtype=F64)
    A = torch.randn(4, 40, generator=gen, dtype=F64)
    weights = [0.1, 0.3, 0.6]

    # Execute
    delta_B = product_correction_ls([B.clone()] * 3, [A.clone()] * 3, weights, lam)

    # Assert
    assert delta_B.shape == (48, 4)
    assert max_abs(delta_B) <= 1e-12


def test_lorafair_ls_takes_unnormalised_weights_as_given():
    # Prepare: FedAU-style weights summing to 2.5; renormalising them would change D
    gen = torch.Generator().manual_seed(205)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = [0.5, 1.0, 1.0]
    normalised = [w / 2.5 for w in weights]

    # Execute
    delta_B = product_correction_ls(Bs, As, weights, 0.01)

    # Assert
    assert max_abs(delta_B - dense_ls_correction(Bs, As, weights, 0.01)) <= 1e-10
    assert max_abs(delta_B - dense_ls_correction(Bs, As, normalised, 0.01)) > 1e-3


@pytest.mark.parametrize("lam", [-0.01, math.inf, math.nan])
def test_lorafair_ls_rejects_bad_lambda(lam):
    # Prepare
    Bs, As = random_clients(torch.Generator().manual_seed(206), 6, 5, 2, 2)

    # Execute / Assert
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        product_correction_ls(Bs, As, [0.5, 0.5], lam)


def test_lorafair_rejects_mismatched_clients():
    # Prepare
    gen = torch.Generator().manual_seed(207)
    Bs = [torch.randn(6, 2, generator=gen, dtype=F64), torch.randn(6, 3, generator=gen, dtype=F64)]
    As = [torch.randn(2, 5, generator=gen, dtype=F64), torch.randn(3, 5, generator=gen, dtype=F64)]

    # Execute / Assert
    with pytest.raises(ValueError, match="client 1: B \\(6, 3\\) and A \\(3, 5\\) do not match"):
        product_correction_ls(Bs, As, [0.5, 0.5], 0.01)
    with pytest.raises(ValueError, match="2 B, 2 A, 3 weights"):
        product_correction_ls(Bs, As, [0.2, 0.3, 0.5], 0.01)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), num_clients=st.integers(1, 4),
       lam=st.sampled_from([0.01, 1.0, 100.0]), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_lorafair_ls_matches_dense_oracle_property(m, n, num_clients, lam, data, seed):
    # Prepare
    rank = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(seed)
    Bs, As = random_clients(gen, m, n, rank, num_clients)
    weights = random_weights(gen, num_clients)
    expected = dense_ls_correction(Bs, As, weights, lam)
    target = dense_target(Bs, As, weights)
    B_bar, A_bar = dense_means(Bs, As, weights)

    # Execute
    delta_B = product_correction_ls(Bs, As, weights, lam)

    # Assert
    assert delta_B.shape == (m, rank)
    assert max_abs(delta_B - expected) <= 1e-9 * max(1.0, max_abs(expected))
    assert fro(target - (B_bar + delta_B) @ A_bar) <= fro(target - B_bar @ A_bar) * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# LoRA-FAIR, paper-faithful: min_D 1 - cos(dW*, (B_bar + D) A_bar) + lam ||D||_F by Adam


def test_lorafair_factored_cosine_equals_dense_cosine():
    # Prepare
    gen = torch.Generator().manual_seed(300)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    delta_B = torch.randn(48, 4, generator=gen, dtype=F64)
    for weights in (random_weights(gen, 3), [0.5, 2.0, 1.0]):  # also FedAU-style, unnormalised
        target = dense_target(Bs, As, weights)
        B_bar, A_bar = dense_means(Bs, As, weights)

        # Execute
        plain = factored_product_cosine(Bs, As, weights)
        corrected = factored_product_cosine(Bs, As, weights, delta_B)

        # Assert
        assert plain == pytest.approx(dense_cosine(target, B_bar @ A_bar), abs=1e-10)
        assert corrected == pytest.approx(dense_cosine(target, (B_bar + delta_B) @ A_bar),
                                          abs=1e-10)
        assert abs(plain - corrected) > 1e-3


def test_lorafair_cos_improves_objective_and_cosine():
    # Prepare
    gen = torch.Generator().manual_seed(301)
    Bs, As = lora_like_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    zero = torch.zeros(48, 4, dtype=F64)
    start_objective = dense_fair_objective(Bs, As, weights, zero, 0.01)

    # Execute
    delta_B = product_correction_cos(Bs, As, weights)

    # Assert
    assert delta_B.shape == (48, 4) and delta_B.dtype == F64
    final_objective = dense_fair_objective(Bs, As, weights, delta_B, 0.01)
    assert final_objective < start_objective - 1e-5  # strictly better, not just D = 0
    assert factored_product_cosine(Bs, As, weights, delta_B) > factored_product_cosine(Bs, As, weights)
    assert fro(delta_B) > 0


def test_lorafair_cos_without_penalty_reaches_least_squares_cosine():
    # Prepare: with lam = 0 the best cosine over {X A_bar} is that of the projection of dW*
    gen = torch.Generator().manual_seed(302)
    Bs, As = lora_like_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    best_possible = factored_product_cosine(Bs, As, weights, product_correction_ls(Bs, As, weights, 0.0))

    # Execute
    delta_B = product_correction_cos(Bs, As, weights, lam=0.0, steps=300)

    # Assert
    reached = factored_product_cosine(Bs, As, weights, delta_B)
    assert reached == pytest.approx(best_possible, abs=1e-8)
    assert best_possible - factored_product_cosine(Bs, As, weights) > 1e-4


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_lorafair_cos_never_worse_than_start(lam):
    # Prepare: order-one factors, where the penalty can dominate
    gen = torch.Generator().manual_seed(303)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    zero = torch.zeros(48, 4, dtype=F64)

    # Execute
    delta_B = product_correction_cos(Bs, As, weights, lam=lam, steps=50)

    # Assert
    assert (dense_fair_objective(Bs, As, weights, delta_B, lam)
            <= dense_fair_objective(Bs, As, weights, zero, lam) + 1e-12)
    assert factored_product_cosine(Bs, As, weights, delta_B) >= factored_product_cosine(Bs, As, weights) - 1e-12


def test_lorafair_cos_returns_best_iterate_when_adam_overshoots():
    # Prepare: an absolute lr of 1 on B entries of size 1e-2 makes every Adam step overshoot
    gen = torch.Generator().manual_seed(308)
    Bs, As = lora_like_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)
    zero = torch.zeros(48, 4, dtype=F64)
    start_objective = dense_fair_objective(Bs, As, weights, zero, 0.01)
    last_iterate_objective = dense_fair_objective(Bs, As, weights, torch.full_like(zero, 1.0),
                                                  0.01)

    # Execute
    delta_B = product_correction_cos(Bs, As, weights, lr=1.0, steps=5)

    # Assert
    assert last_iterate_objective > start_objective  # a step of size lr is worse than D = 0
    assert dense_fair_objective(Bs, As, weights, delta_B, 0.01) <= start_objective
    assert torch.equal(delta_B, zero)


def test_lorafair_cos_large_lambda_gives_exactly_zero():
    # Prepare: ||grad (1 - cos)(0)||_F <= lam, so D = 0 is optimal (first-order condition)
    gen = torch.Generator().manual_seed(309)
    Bs, As = lora_like_clients(gen, 48, 40, 4, 3)
    weights = random_weights(gen, 3)

    # Execute
    small = product_correction_cos(Bs, As, weights, lam=0.01)
    large = product_correction_cos(Bs, As, weights, lam=1e3)

    # Assert
    assert fro(small) > 0
    assert torch.equal(large, torch.zeros(48, 4, dtype=F64))


def test_lorafair_cos_identical_clients_give_zero():
    # Prepare
    gen = torch.Generator().manual_seed(304)
    Bs, As = lora_like_clients(gen, 48, 40, 4, 1)
    weights = [0.2, 0.3, 0.5]

    # Execute
    delta_B = product_correction_cos(Bs * 3, As * 3, weights)

    # Assert
    assert delta_B.shape == (48, 4)
    assert fro(delta_B) <= 1e-8


def test_lorafair_cos_zero_target_or_zero_steps_give_zero():
    # Prepare
    gen = torch.Generator().manual_seed(305)
    Bs, As = lora_like_clients(gen, 12, 10, 2, 2)
    zero_Bs = [torch.zeros(12, 2, dtype=F64)] * 2

    # Execute
    no_target = product_correction_cos(zero_Bs, As, [0.5, 0.5])
    no_steps = product_correction_cos(Bs, As, [0.5, 0.5], steps=0)

    # Assert
    assert torch.equal(no_target, torch.zeros(12, 2, dtype=F64))
    assert torch.equal(no_steps, torch.zeros(12, 2, dtype=F64))


def test_lorafair_cos_runs_under_inference_mode_and_keeps_float32():
    # Prepare: a server may aggregate under inference_mode; the inner Adam still needs autograd
    gen = torch.Generator().manual_seed(306)
    Bs, As = lora_like_clients(gen, 24, 20, 2, 3)
    expected = product_correction_cos(Bs, As, [0.2, 0.3, 0.5], steps=20)

    # Execute
    with torch.inference_mode():
        inside = product_correction_cos(Bs, As, [0.2, 0.3, 0.5], steps=20)
        as_float32 = product_correction_cos([B.float() for B in Bs], [A.float() for A in As],
                                             [0.2, 0.3, 0.5], steps=20)

    # Assert
    assert torch.equal(inside, expected)
    assert as_float32.dtype == torch.float32
    assert max_abs(as_float32.double() - expected) <= 1e-5 * max_abs(expected)
    assert fro(expected) > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"lam": -1.0}, "lam must be"), ({"steps": -1}, "steps must be"),
    ({"steps": 2.5}, "steps must be"), ({"lr": 0.0}, "lr must be"),
])
def test_lorafair_cos_rejects_bad_arguments(kwargs, message):
    # Prepare
    Bs, As = random_clients(torch.Generator().manual_seed(307), 6, 5, 2, 2)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        product_correction_cos(Bs, As, [0.5, 0.5], **kwargs)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), num_clients=st.integers(1, 4),
       B_scale=st.sampled_from([1e-3, 1e-2, 1.0]), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_lorafair_cos_matches_dense_objective_property(m, n, num_clients, B_scale, data, seed):
    # Prepare
    rank = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(seed)
    Bs, As = random_clients(gen, m, n, rank, num_clients, B_scale)
    weights = random_weights(gen, num_clients)
    zero = torch.zeros(m, rank, dtype=F64)
    B_bar, A_bar = dense_means(Bs, As, weights)
    target = dense_target(Bs, As, weights)

    # Execute
    delta_B = product_correction_cos(Bs, As, weights, steps=25)

    # Assert: the factored cosine is the dense one, and the result never scores worse than D = 0
    assert delta_B.shape == (m, rank)
    assert factored_product_cosine(Bs, As, weights, delta_B) == pytest.approx(
        dense_cosine(target, (B_bar + delta_B) @ A_bar), abs=1e-10)
    assert (dense_fair_objective(Bs, As, weights, delta_B, 0.01)
            <= dense_fair_objective(Bs, As, weights, zero, 0.01) + 1e-10)


# --------------------------------------------------------------------------------------------
# FedEx-LoRA: residual E_w[B_k A_k] - B_bar A_bar folded into W0


def fedex_server(rank: int, alpha: float):
    from fedlora.config import RunConfig
    from fedlora.strategies import get_strategy

    cfg = RunConfig.from_dict({"strategy": "fedex", "clients": 4, "clients_per_round": 3,
                               "rank": rank, "alpha": alpha})
    return get_strategy("fedex").from_config(cfg, frozenset())


def fedex_server_round(W0, Bs, As, weights, rank, alpha):
    """One aggregation by the FedEx server: its new W0' = W0 + base delta and B_bar, A_bar."""
    server = fedex_server(rank, alpha)
    state = {"l.lora_A.weight": torch.zeros_like(As[0]), "l.lora_B.weight": torch.zeros_like(Bs[0])}
    updates = [{"l.lora_A.weight": A, "l.lora_B.weight": B} for B, A in zip(Bs, As)]
    new_state = server.aggregate(state, updates, weights)
    return (W0 + server.global_base_delta()["l"], new_state["l.lora_B.weight"],
            new_state["l.lora_A.weight"])


def explicit_loop_update(W0, Bs, As, weights, scale) -> torch.Tensor:
    """W0 + s sum_k w_k B_k A_k, entry by entry of each dense client product."""
    out = W0.clone()
    for w, B, A in zip(weights, Bs, As):
        product = B @ A
        for i in range(W0.shape[0]):
            for j in range(W0.shape[1]):
                out[i, j] += scale * w * product[i, j]
    return out


def test_fedex_server_update_is_exact_on_non_square_layer():
    # Prepare
    gen = torch.Generator().manual_seed(400)
    m, n, rank, num_clients, alpha = 48, 40, 4, 3, 8.0  # s = alpha / r = 2
    W0 = torch.randn(m, n, generator=gen, dtype=F64)
    Bs, As = random_clients(gen, m, n, rank, num_clients)
    weights = random_weights(gen, num_clients)
    expected = explicit_loop_update(W0, Bs, As, weights, alpha / rank)

    # Execute
    W0_new, B_bar, A_bar = fedex_server_round(W0, Bs, As, weights, rank, alpha)

    # Assert: the server's model W0' + s B_bar A_bar is the clients' mean model
    assert W0_new.shape == W0.shape and W0_new.dtype == F64
    assert max_abs(W0_new + (alpha / rank) * B_bar @ A_bar - expected) <= 1e-12 * max_abs(expected)
    # FedIT alone (W0 unchanged) would be off by this much
    assert max_abs(W0 + (alpha / rank) * B_bar @ A_bar - expected) > 0.1


def test_fedex_factored_residual_equals_dense():
    # Prepare
    gen = torch.Generator().manual_seed(401)
    m, n, rank, num_clients = 48, 40, 4, 3
    Bs, As = random_clients(gen, m, n, rank, num_clients)
    weights = random_weights(gen, num_clients)

    # Execute
    B_stack, A_stack = product_mean_residual_factors(Bs, As, weights)
    residual = product_mean_residual(Bs, As, weights)

    # Assert: both equal E_w[B_k A_k] - B_bar A_bar formed densely, client by client
    B_bar, A_bar = dense_means(Bs, As, weights)
    dense = dense_target(Bs, As, weights) - B_bar @ A_bar
    assert B_stack.shape == (m, (num_clients + 1) * rank)
    assert A_stack.shape == ((num_clients + 1) * rank, n)
    assert max_abs(B_stack @ A_stack - dense) <= 1e-12
    assert max_abs(residual - dense) <= 1e-12
    assert max_abs(B_stack[:, -rank:] + B_bar) <= 1e-15
    assert max_abs(A_stack[-rank:] - A_bar) <= 1e-15
    assert torch.equal(B_stack[:, :rank], weights[0] * Bs[0])
    assert torch.equal(A_stack[rank:2 * rank], As[1])


def test_fedex_residual_is_zero_for_one_client_and_identical_clients():
    # Prepare
    gen = torch.Generator().manual_seed(402)
    B = torch.randn(48, 4, generator=gen, dtype=F64)
    A = torch.randn(4, 40, generator=gen, dtype=F64)

    # Execute
    single = product_mean_residual([B], [A], [1.0])
    identical = product_mean_residual([B.clone()] * 3, [A.clone()] * 3, [0.1, 0.3, 0.6])
    B_stack, A_stack = product_mean_residual_factors([B.clone()] * 3, [A.clone()] * 3, [0.1, 0.3, 0.6])

    # Assert
    assert max_abs(single) <= 1e-12
    assert max_abs(identical) <= 1e-12
    assert max_abs(B_stack @ A_stack) <= 1e-12


def test_fedex_residual_rank_is_bounded():
    # Prepare: with weights summing to 1 the residual is E_w[(B_k - B_bar)(A_k - A_bar)], whose
    # K terms are linearly dependent: rank (K - 1) r <= K r. Unnormalised weights reach K r.
    gen = torch.Generator().manual_seed(403)
    m, n, rank, num_clients = 48, 40, 4, 3
    Bs, As = random_clients(gen, m, n, rank, num_clients)

    # Execute
    normalised = product_mean_residual(Bs, As, random_weights(gen, num_clients))
    unnormalised = product_mean_residual(Bs, As, [0.5, 1.0, 2.0])

    # Assert
    assert torch.linalg.matrix_rank(normalised).item() == (num_clients - 1) * rank
    assert torch.linalg.matrix_rank(unnormalised).item() == num_clients * rank


def test_fedex_uniform_weights_equal_official_unweighted_mean():
    # Prepare: fed_agg.py::aggregate_models_ours, for a nn.Linear layer (no transpose)
    gen = torch.Generator().manual_seed(404)
    num_clients = 4
    Bs, As = random_clients(gen, 48, 40, 4, num_clients)
    products = torch.stack([B @ A for B, A in zip(Bs, As)]).mean(0)
    official = products - torch.stack(Bs).mean(0) @ torch.stack(As).mean(0)

    # Execute
    residual = product_mean_residual(Bs, As, [1 / num_clients] * num_clients)

    # Assert
    assert residual.shape == official.shape == (48, 40)
    assert max_abs(residual - official) <= 1e-12


def test_fedex_server_update_is_exact_with_unnormalised_weights():
    # Prepare: FedAU-style weights are used as given; the identity holds for any weights
    gen = torch.Generator().manual_seed(405)
    Bs, As = random_clients(gen, 48, 40, 4, 3)
    weights = [0.5, 2.0, 1.5]
    W0 = torch.randn(48, 40, generator=gen, dtype=F64)
    expected = explicit_loop_update(W0, Bs, As, weights, 2.0)

    # Execute
    W0_new, B_bar, A_bar = fedex_server_round(W0, Bs, As, weights, 4, 8.0)

    # Assert
    assert max_abs(B_bar - sum(w * B for w, B in zip(weights, Bs))) <= 1e-12
    assert max_abs(W0_new + 2.0 * B_bar @ A_bar - expected) <= 1e-11


def test_fedex_float32_keeps_dtype():
    # Prepare
    gen = torch.Generator().manual_seed(406)
    Bs = [torch.randn(48, 4, generator=gen) for _ in range(3)]
    As = [torch.randn(4, 40, generator=gen) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]

    # Execute
    residual = product_mean_residual(Bs, As, weights)
    B_stack, A_stack = product_mean_residual_factors(Bs, As, weights)

    # Assert
    assert residual.dtype == B_stack.dtype == A_stack.dtype == torch.float32
    Bs64, As64 = [B.double() for B in Bs], [A.double() for A in As]
    B_bar, A_bar = dense_means(Bs64, As64, weights)
    expected = dense_target(Bs64, As64, weights) - B_bar @ A_bar
    assert max_abs(residual.double() - expected) <= 1e-5 * max_abs(expected)
    assert max_abs((B_stack.double() @ A_stack.double()) - expected) <= 1e-5 * max_abs(expected)


def test_fedex_rejects_mismatched_clients():
    # Prepare
    gen = torch.Generator().manual_seed(407)
    Bs = [torch.randn(6, 2, generator=gen, dtype=F64)] * 2
    As = [torch.randn(2, 5, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64)]

    # Execute / Assert
    with pytest.raises(ValueError, match="client 1"):
        product_mean_residual(Bs, As, [0.5, 0.5])
    with pytest.raises(ValueError, match="0 B, 0 A, 0 weights"):
        product_mean_residual_factors([], [], [])


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), num_clients=st.integers(1, 4), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_fedex_matches_dense_loop_property(m, n, num_clients, data, seed):
    # Prepare
    rank = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(seed)
    Bs, As = random_clients(gen, m, n, rank, num_clients)
    weights = random_weights(gen, num_clients)
    B_bar, A_bar = dense_means(Bs, As, weights)
    slow = dense_target(Bs, As, weights) - B_bar @ A_bar

    # Execute
    residual = product_mean_residual(Bs, As, weights)
    B_stack, A_stack = product_mean_residual_factors(Bs, As, weights)

    # Assert
    assert residual.shape == (m, n)
    assert B_stack.shape == (m, (num_clients + 1) * rank)
    assert A_stack.shape == ((num_clients + 1) * rank, n)
    assert max_abs(residual - slow) <= 1e-12 * max(1.0, max_abs(slow))
    assert max_abs(B_stack @ A_stack - slow) <= 1e-12 * max(1.0, max_abs(slow))
    # Rank up to rounding: singular values below 1e-10 of the factors' scale count as zero.
    factor_scale = sum(w * fro(B) * fro(A) for w, B, A in zip(weights, Bs, As))
    assert torch.linalg.matrix_rank(residual, atol=1e-10 * factor_scale).item() \
        <= num_clients * rank
