"""The maths of clients of different ranks (fedlora.aggregation.heterogeneous), in float64,
against dense references computed here (m x n products, a dense SVD) and a worked example."""

import math

import pytest
import torch

from fedlora.aggregation.heterogeneous import (sparsity_weights, stacked_factors, tail_norm,
                                               truncate, truncated_factors, update_norms,
                                               zero_pad)
from fedlora.aggregation.maths import weighted_mean_states


def clients(ranks, m=12, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in ranks]
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks]
    return Bs, As


def dense_update(Bs, As, weights, scales):
    return sum(w * s * B @ A for w, s, B, A in zip(weights, scales, Bs, As))


@pytest.mark.parametrize("ranks", [(2, 4, 8), (8, 2), (4,)])
def test_flora_stack_is_the_exact_weighted_sum_for_any_ranks(ranks):
    # Prepare
    Bs, As = clients(ranks)
    weights = [0.5, 0.3, 0.2][: len(ranks)]
    scales = [16.0 / r for r in ranks]

    # Execute
    B, A = stacked_factors(Bs, As, weights, scales)

    # Assert
    assert B.shape == (12, sum(ranks)) and A.shape == (sum(ranks), 9)
    torch.testing.assert_close(B @ A, dense_update(Bs, As, weights, scales), rtol=0, atol=1e-12)


def test_flexlora_factors_are_the_best_rank_r_approximation():
    # Prepare: the dense reference update and its SVD
    ranks = (2, 4, 8)
    Bs, As = clients(ranks, seed=1)
    weights, scales = [0.2, 0.3, 0.5], [2.0, 2.0, 2.0]
    dense = dense_update(Bs, As, weights, scales)
    U, S, Vh = torch.linalg.svd(dense)
    client_scales = {r: 32.0 / r for r in ranks}

    # Execute
    out = truncated_factors(Bs, As, weights, scales, ranks, client_scales)

    # Assert: s_r B_r A_r is the rank-r SVD truncation, its error is the discarded
    # singular values' norm (Eckart-Young), and sqrt(S) is split between the factors
    for r in ranks:
        B_r, A_r, error = out[r]
        approx = client_scales[r] * B_r @ A_r
        torch.testing.assert_close(approx, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=0,
                                   atol=1e-10)
        assert error == pytest.approx(float(torch.linalg.norm(dense - approx)), rel=1e-9)
        assert error == pytest.approx(float(S[r:].square().sum().sqrt()), rel=1e-9)
        torch.testing.assert_close(torch.linalg.norm(A_r, dim=1), S[:r].sqrt(), rtol=1e-10, atol=0)
        torch.testing.assert_close(client_scales[r] * torch.linalg.norm(B_r, dim=0), S[:r].sqrt(),
                                   rtol=1e-10, atol=0)
    # and any other rank-2 matrix is further away
    g = torch.Generator().manual_seed(5)
    other = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 9, generator=g, dtype=torch.float64)
    assert float(torch.linalg.norm(dense - other)) > out[2][2]


def test_flexlora_rank_above_the_update_rank_is_exact_and_padded():
    # Prepare: one rank-2 client; a rank-8 tier
    Bs, As = clients((2,), seed=2)

    # Execute
    B_r, A_r, error = truncated_factors(Bs, As, [1.0], [1.0], [8])[8]

    # Assert
    assert B_r.shape == (12, 8) and A_r.shape == (8, 9)
    assert error == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(B_r @ A_r, Bs[0] @ As[0], rtol=0, atol=1e-12)


def test_hetlora_worked_example():
    # Prepare, by hand from the paper's equations (Fig. 2): m = n = 2, alpha/r = 1.
    # client 1, rank 1: B1 = [1, 0]^T, A1 = [2, 0]; B1 A1 = [[2, 0], [0, 0]], norm 2
    # client 2, rank 2: B2 = I, A2 = [[0, 1], [1, 0]];   B2 A2 = A2,            norm sqrt(2)
    B1, A1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    B2 = torch.eye(2, dtype=torch.float64)
    A2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    z = 2 + math.sqrt(2)
    w1, w2 = 2 / z, math.sqrt(2) / z  # 0.5858, 0.4142

    # Execute
    weights = sparsity_weights([B1, B2], [A1, A2])
    B1p, A1p = zero_pad(B1, A1, 2)
    B_global = weights[0] * B1p + weights[1] * B2
    A_global = weights[0] * A1p + weights[1] * A2
    B_rank1, A_rank1 = truncate(B_global, A_global, 1)

    # Assert
    assert weights == pytest.approx([w1, w2], abs=1e-12)
    assert B1p.tolist() == [[1.0, 0.0], [0.0, 0.0]] and A1p.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    def close(tensor, expected):
        torch.testing.assert_close(tensor, torch.tensor(expected, dtype=torch.float64), rtol=0,
                                   atol=1e-12)

    close(B_global, [[w1 + w2, 0.0], [0.0, w2]])  # [[1, 0], [0, w2]]
    close(A_global, [[2 * w1, w2], [w2, 0.0]])
    close(B_rank1, [[1.0], [0.0]])
    close(A_rank1, [[2 * w1, w2]])


def test_update_norms_match_the_dense_frobenius_norm():
    # Prepare
    Bs, As = clients((2, 4, 8), seed=3)
    scales = [0.5, 1.0, 4.0]

    # Execute / Assert
    expected = [float(torch.linalg.norm(s * B @ A)) for s, B, A in zip(scales, Bs, As)]
    assert update_norms(Bs, As, scales) == pytest.approx(expected, rel=1e-12)
    assert sum(sparsity_weights(Bs, As, scales)) == pytest.approx(1.0)


def test_equal_ranks_reduce_to_the_homogeneous_maths():
    # Prepare: three rank-4 clients, sample weights, one scale
    Bs, As = clients((4, 4, 4), seed=4)
    weights, scale = [0.5, 0.25, 0.25], 2.0

    # FLoRA's stack is the exact product mean E_w[s B_k A_k] (what FedEx-LoRA's W0 + s B_bar
    # A_bar equals after aggregation)
    B, A = stacked_factors(Bs, As, weights, [scale] * 3)
    torch.testing.assert_close(B @ A, scale * sum(w * b @ a for w, b, a in zip(weights, Bs, As)),
                               rtol=0, atol=1e-12)
    # HetLoRA without pruning: padding and truncation are the identity, so with sample weights
    # in place of the sparsity weights its aggregate is FedIT's mean of B and of A
    padded = [zero_pad(b, a, 4) for b, a in zip(Bs, As)]
    assert all(torch.equal(p[0], b) and torch.equal(p[1], a) for p, b, a in zip(padded, Bs, As))
    fedit = weighted_mean_states([{"B": b, "A": a} for b, a in zip(Bs, As)], weights)
    hetlora_B = sum(w * truncate(b, a, 4)[0] for w, (b, a) in zip(weights, padded))
    torch.testing.assert_close(hetlora_B, fedit["B"], rtol=0, atol=1e-15)
    # FlexLoRA with one client at its own rank returns its update exactly
    B_r, A_r, error = truncated_factors(Bs[:1], As[:1], [1.0], [scale], [4], {4: scale})[4]
    torch.testing.assert_close(scale * B_r @ A_r, scale * Bs[0] @ As[0], rtol=0, atol=1e-12)
    assert error == pytest.approx(0.0, abs=1e-12)


def test_tail_norm_is_differentiable_and_ignores_the_kept_ranks():
    # Prepare
    B = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    # Execute
    value = tail_norm(B, A, keep=3)
    value.backward()

    # Assert
    assert float(value) == pytest.approx(float(B[:, 3:].norm() * A[3:].norm()))
    assert torch.all(B.grad[:, :3] == 0) and torch.all(A.grad[:3] == 0)
    assert B.grad[:, 3:].abs().sum() > 0


@pytest.mark.parametrize("call", [
    lambda: stacked_factors([torch.zeros(3, 2)], [torch.zeros(3, 4)], [1.0]),
    lambda: stacked_factors([torch.zeros(3, 2)], [torch.zeros(2, 4)], [float("nan")]),
    lambda: zero_pad(torch.zeros(3, 4), torch.zeros(4, 2), 2),
    lambda: truncate(torch.zeros(3, 2), torch.zeros(2, 4), 3),
    lambda: truncated_factors([torch.zeros(3, 2)], [torch.zeros(2, 4)], [1.0], None, [0]),
])
def test_bad_shapes_and_values_are_refused(call):
    with pytest.raises(ValueError):
        call()


def _layer_state(B, A, R=None):
    from fedlora.model.adapters import factor_key

    state = {factor_key("enc.q", "B"): B, factor_key("enc.q", "A"): A, "head.weight": torch.ones(3)}
    if R is not None:
        state[factor_key("enc.q", "R")] = R
    return state


def _product_at(state, rank):
    from fedlora.model.adapters import factor_key, state_at_rank

    cut = state_at_rank(state, rank)
    B, A = cut[factor_key("enc.q", "B")], cut[factor_key("enc.q", "A")]
    R = cut.get(factor_key("enc.q", "R"))
    return B @ A if R is None else B @ R @ A


@pytest.mark.parametrize("zero", ["none", "B tail", "A tail", "B"])
def test_same_model_at_rank_is_true_exactly_when_the_cut_keeps_the_dense_update(zero):
    """Oracle: the dense update B A of the factors cut to rank r against the uncut one."""
    from fedlora.model.adapters import same_model_at_rank

    # Prepare: a rank-8 layer whose slices beyond rank 3 are zero in B, in A, or nowhere
    g = torch.Generator().manual_seed(7)
    B = torch.randn(10, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 6, generator=g, dtype=torch.float64)
    if zero == "B tail":
        B[:, 3:] = 0
    elif zero == "A tail":
        A[3:, :] = 0
    elif zero == "B":  # round 0: B = 0, every tier holds the base model
        B.zero_()
    state = _layer_state(B, A)

    # Execute / Assert: the answer agrees with the dense products at every rank
    for rank in range(1, 11):
        dense_same = torch.equal(_product_at(state, rank), B @ A)
        assert same_model_at_rank(state, rank) == dense_same, rank
    assert same_model_at_rank(state, 3) == (zero != "none")
    assert same_model_at_rank(state, 8) and same_model_at_rank(state, 12)


def test_same_model_at_rank_with_a_square_middle_factor():
    from fedlora.model.adapters import same_model_at_rank

    g = torch.Generator().manual_seed(8)
    B = torch.randn(10, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 5, generator=g, dtype=torch.float64)
    R = torch.zeros(6, 6, dtype=torch.float64)
    R[:2, :2] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    state = _layer_state(B, A, R)
    assert same_model_at_rank(state, 2) and torch.allclose(_product_at(state, 2), B @ R @ A,
                                                           rtol=0, atol=1e-12)
    R[4, 1] = 0.5  # outside the kept block: the cut changes the update
    assert not same_model_at_rank(state, 2)
    assert not torch.allclose(_product_at(state, 2), B @ R @ A)
