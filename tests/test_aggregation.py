"""Aggregation maths (fedlora.aggregation.maths): exactness invariants in float64, on random shapes.

ALGORITHMS.md, "Invariants": 1 (Fed-SB exact), 6 (FedIT identity / non-zero gap), 9 (equal sizes
give the official unweighted mean), and LoRA-SB's initialisation (arXiv 2411.19557, sec. 4).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.model.adapters import LoRALinear
from fedlora.aggregation.maths import (lora_sb_init, product_gap, sample_weights, weighted_mean_states,
                                       weighted_sum)

F64 = torch.float64


def random_weights(generator: torch.Generator, count: int) -> list[float]:
    """Positive weights summing to 1 (up to rounding), as sample weights are."""
    raw = torch.rand(count, generator=generator, dtype=F64) + 0.1
    return (raw / raw.sum()).tolist()


def max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item()


# --------------------------------------------------------------------------------------------
# Fed-SB: B (sum_k w_k R_k) A == sum_k w_k B R_k A, checked on the layers' outputs: a LoRA-SB
# layer's output is linear in R, so the layer holding the aggregated R must answer every input
# with the weighted sum of the client layers' answers (no product is formed by the test).


def latent_layer(base: torch.nn.Linear, B: torch.Tensor, R: torch.Tensor, A: torch.Tensor,
                 alpha: float) -> LoRALinear:
    """A real ``LoRALinear`` with latent R in float64, holding the given factors."""
    layer = LoRALinear(base, rank=R.shape[0], alpha=alpha, latent=True)
    with torch.no_grad():
        layer.lora_B.weight.copy_(B)
        layer.lora_R.weight.copy_(R)
        layer.lora_A.weight.copy_(A)
    return layer


def float64_base(gen: torch.Generator, m: int, n: int) -> torch.nn.Linear:
    base = torch.nn.Linear(n, m, bias=True, dtype=F64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=gen, dtype=F64))
        base.bias.copy_(torch.randn(m, generator=gen, dtype=F64))
    return base


def weighted_client_outputs(base, B, Rs, A, weights, alpha, x) -> torch.Tensor:
    """sum_k w_k layer_k(x) with sum_k w_k = 1, one client layer at a time."""
    out = torch.zeros(x.shape[0], base.out_features, dtype=F64)
    for w, R in zip(weights, Rs):
        out += w * latent_layer(base, B, R, A, alpha)(x)
    return out


@torch.no_grad()
def test_fedsb_aggregated_layer_answers_as_the_clients_mean_on_non_square_layer():
    # Prepare: the Fed-SB server's aggregate on 3 clients' R, then real layers
    gen = torch.Generator().manual_seed(0)
    m, n, r, num_clients, alpha = 48, 40, 4, 3, 8.0
    base = float64_base(gen, m, n)
    B, _, A = lora_sb_init(torch.randn(m, n, generator=gen, dtype=F64), r, 1e-3)
    Rs = [torch.randn(r, r, generator=gen, dtype=F64) for _ in range(num_clients)]
    weights = random_weights(gen, num_clients)
    weights[-1] = 1.0 - sum(weights[:-1])  # exactly one: the bias is then kept exactly
    state = {"l.lora_A.weight": A, "l.lora_B.weight": B, "l.lora_R.weight": torch.eye(r, dtype=F64)}
    x = torch.randn(64, n, generator=gen, dtype=F64)
    expected = weighted_client_outputs(base, B, Rs, A, weights, alpha, x)

    # Execute
    new_state = make_strategy("fedsb").aggregate(state, [{"l.lora_R.weight": R} for R in Rs],
                                                 weights)
    aggregated = latent_layer(base, new_state["l.lora_B.weight"], new_state["l.lora_R.weight"],
                              new_state["l.lora_A.weight"], alpha)(x)

    # Assert
    assert aggregated.shape == (64, m) and aggregated.dtype == F64
    assert max_abs(aggregated - expected) <= 1e-12 * max(1.0, max_abs(expected))
    # The check is not vacuous: the clients' layers answer differently, by order one.
    first, second = (latent_layer(base, B, R, A, alpha)(x) for R in Rs[:2])
    assert max_abs(first - second) > 0.1


@torch.no_grad()
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 6),
       num_clients=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fedsb_aggregation_is_exact_on_layer_outputs_property(m, n, r, num_clients, seed):
    # Prepare: factors need not be orthonormal for exactness; B and A are shared, R differs
    gen = torch.Generator().manual_seed(seed)
    base = float64_base(gen, m, n)
    B = torch.randn(m, r, generator=gen, dtype=F64)
    A = torch.randn(r, n, generator=gen, dtype=F64)
    Rs = [torch.randn(r, r, generator=gen, dtype=F64) for _ in range(num_clients)]
    weights = random_weights(gen, num_clients)
    weights[-1] = 1.0 - sum(weights[:-1])
    x = torch.randn(8, n, generator=gen, dtype=F64)
    expected = weighted_client_outputs(base, B, Rs, A, weights, 2.0 * r, x)

    # Execute
    aggregated = latent_layer(base, B, weighted_sum(Rs, weights), A, 2.0 * r)(x)

    # Assert
    assert aggregated.shape == (8, m)
    assert max_abs(aggregated - expected) <= 1e-12 * max(1.0, max_abs(expected))


# --------------------------------------------------------------------------------------------
# FedIT's aggregation error E_w[B_k A_k] - E_w[B_k] E_w[A_k]


def test_product_gap_is_zero_when_all_A_are_shared():
    # Prepare: FFA-LoRA's case, A frozen and identical on every client
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 40, generator=gen, dtype=F64)
    Bs = [torch.randn(48, 4, generator=gen, dtype=F64) for _ in range(3)]
    weights = random_weights(gen, 3)

    # Execute
    gap = product_gap(Bs, [A.clone() for _ in Bs], weights)

    # Assert
    assert gap.shape == (48, 40)
    assert max_abs(gap) <= 1e-12


def test_product_gap_is_zero_for_one_client():
    # Prepare
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(48, 4, generator=gen, dtype=F64)
    A = torch.randn(4, 40, generator=gen, dtype=F64)

    # Execute
    gap = product_gap([B], [A], [1.0])

    # Assert
    assert max_abs(gap) <= 1e-12


def test_product_gap_is_zero_for_identical_clients():
    # Prepare
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(48, 4, generator=gen, dtype=F64)
    A = torch.randn(4, 40, generator=gen, dtype=F64)
    weights = sample_weights([10, 30, 60])

    # Execute
    gap = product_gap([B.clone()] * 3, [A.clone()] * 3, weights)

    # Assert
    assert max_abs(gap) <= 1e-12


def test_product_gap_is_positive_for_independent_factors():
    # Prepare
    gen = torch.Generator().manual_seed(4)
    Bs = [torch.randn(48, 4, generator=gen, dtype=F64) for _ in range(3)]
    As = [torch.randn(4, 40, generator=gen, dtype=F64) for _ in range(3)]
    weights = random_weights(gen, 3)

    # Execute
    gap = product_gap(Bs, As, weights)

    # Assert
    assert torch.linalg.matrix_norm(gap).item() > 1e-3


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 20), r=st.integers(1, 5),
       num_clients=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_product_gap_equals_weighted_cross_covariance(m, n, r, num_clients, seed):
    # Prepare
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=gen, dtype=F64) for _ in range(num_clients)]
    As = [torch.randn(r, n, generator=gen, dtype=F64) for _ in range(num_clients)]
    weights = random_weights(gen, num_clients)
    # Weights must sum to exactly one for the identity; renormalise the rounding away.
    weights[-1] = 1.0 - sum(weights[:-1])

    # Execute
    gap = product_gap(Bs, As, weights)
    B_mean = sum(w * B for w, B in zip(weights, Bs))
    A_mean = sum(w * A for w, A in zip(weights, As))
    covariance = sum(w * (B - B_mean) @ (A - A_mean) for w, B, A in zip(weights, Bs, As))

    # Assert
    assert gap.shape == (m, n)
    assert max_abs(gap - covariance) <= 1e-12


# --------------------------------------------------------------------------------------------
# Weighted means of state dicts


def test_weighted_mean_states_with_equal_weights_is_unweighted_mean():
    # Prepare: the official repositories aggregate with torch.stack(...).mean(0)
    gen = torch.Generator().manual_seed(5)
    keys = ("layer.lora_A.weight", "layer.lora_B.weight", "classifier.bias")
    shapes = ((4, 40), (48, 4), (7,))
    states = [{k: torch.randn(s, generator=gen, dtype=F64) for k, s in zip(keys, shapes)}
              for _ in range(4)]
    weights = sample_weights([25, 25, 25, 25])

    # Execute
    mean = weighted_mean_states(states, weights)

    # Assert
    assert weights == [0.25, 0.25, 0.25, 0.25]
    assert set(mean) == set(keys)
    for key, shape in zip(keys, shapes):
        official = torch.stack([s[key] for s in states]).mean(0)
        assert mean[key].shape == shape
        assert max_abs(mean[key] - official) <= 1e-12


def test_weighted_mean_states_restricted_to_keys():
    # Prepare
    states = [{"a": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor([5.0], dtype=F64)},
              {"a": torch.tensor([3.0, 6.0], dtype=F64), "b": torch.tensor([7.0], dtype=F64)}]

    # Execute
    mean = weighted_mean_states(states, [0.25, 0.75], keys=["a"])

    # Assert
    assert list(mean) == ["a"]
    assert mean["a"].tolist() == [2.5, 5.0]


def test_fedavg_of_identical_client_states_is_identity():
    # Prepare
    gen = torch.Generator().manual_seed(6)
    state = {"l.lora_A.weight": torch.randn(4, 40, generator=gen, dtype=F64),
             "l.lora_B.weight": torch.randn(48, 4, generator=gen, dtype=F64),
             "classifier.weight": torch.randn(3, 40, generator=gen, dtype=F64)}
    clients = [{k: v.clone() for k, v in state.items()} for _ in range(3)]
    weights = sample_weights([13, 50, 7])

    # Execute
    mean = weighted_mean_states(clients, weights)

    # Assert
    assert set(mean) == set(state)
    for key, value in state.items():
        assert mean[key].dtype == F64
        assert max_abs(mean[key] - value) <= 1e-14


# --------------------------------------------------------------------------------------------
# Sample weights and weighted sums


def test_sample_weights_are_sample_fractions():
    # Execute
    weights = sample_weights([10, 30, 60])

    # Assert
    assert weights == [0.1, 0.3, 0.6]
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-15)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=20).filter(lambda ns: sum(ns) > 0))
def test_sample_weights_sum_to_one_property(num_examples):
    # Execute
    weights = sample_weights(num_examples)

    # Assert
    assert len(weights) == len(num_examples)
    assert all(w >= 0 for w in weights)
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-12)
    # Exact rationals as the oracle: each weight is n_k / sum n correctly rounded (half an ulp)
    total = sum(num_examples)
    for w, n in zip(weights, num_examples):
        exact = Fraction(n, total)
        assert abs(Fraction(w) - exact) <= exact * Fraction(1, 2**53)


@pytest.mark.parametrize("num_examples", [[0, 0, 0], [0], []])
def test_sample_weights_reject_no_examples(num_examples):
    # Execute / Assert
    with pytest.raises(ValueError, match="at least one example"):
        sample_weights(num_examples)


def test_weighted_sum_exact_on_hand_built_input():
    # Prepare
    tensors = [torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[4.0, -8.0]], dtype=F64)]

    # Execute
    total = weighted_sum(tensors, [0.5, 0.25])

    # Assert
    assert total.tolist() == [[1.5, -1.0]]
    assert total.dtype == F64


def test_weighted_sum_rejects_mismatched_lengths():
    # Prepare
    tensors = [torch.ones(2), torch.ones(2)]

    # Execute / Assert
    with pytest.raises(ValueError, match="2 tensors, 3 weights"):
        weighted_sum(tensors, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="0 tensors, 0 weights"):
        weighted_sum([], [])


# --------------------------------------------------------------------------------------------
# LoRA-SB initialisation: B = U_r, R = diag(S_r), A = V_r^T of -eta * sign(G)


def test_lora_sb_init_factors_are_orthonormal_and_R_diagonal():
    # Prepare
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(48, 40, generator=gen, dtype=F64)
    rank = 6

    # Execute
    B, R, A = lora_sb_init(G, rank, 1e-3)

    # Assert
    assert B.shape == (48, rank) and R.shape == (rank, rank) and A.shape == (rank, 40)
    assert B.dtype == R.dtype == A.dtype == F64
    eye = torch.eye(rank, dtype=F64)
    assert max_abs(B.T @ B - eye) <= 1e-10
    assert max_abs(A @ A.T - eye) <= 1e-10
    diagonal = torch.diagonal(R)
    assert torch.equal(R, torch.diag(diagonal))
    assert (diagonal >= 0).all()
    assert (diagonal[:-1] >= diagonal[1:]).all()
    assert diagonal[0].item() > 0


def test_lora_sb_init_is_best_rank_r_approximation_of_sign_step():
    # Prepare
    gen = torch.Generator().manual_seed(8)
    G = torch.randn(48, 40, generator=gen, dtype=F64)
    rank, eta = 4, 3e-3
    step = -eta * torch.sign(G)
    U, S, Vh = torch.linalg.svd(step, full_matrices=False)
    truncated = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]

    # Execute
    B, R, A = lora_sb_init(G, rank, eta)
    product = B @ R @ A

    # Assert
    assert max_abs(product - truncated) <= 1e-12
    error = torch.linalg.matrix_norm(step - product).item()
    eckart_young = math.sqrt((S[rank:] ** 2).sum().item())
    assert math.isclose(error, eckart_young, rel_tol=1e-8)
    assert torch.allclose(torch.diagonal(R), S[:rank], rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_lora_sb_init_eckart_young_property(m, n, data, seed):
    # Prepare
    rank = data.draw(st.integers(1, min(m, n)))
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    step = -1e-3 * torch.sign(G)
    S = torch.linalg.svdvals(step)

    # Execute
    B, R, A = lora_sb_init(G, rank, 1e-3)

    # Assert
    error = torch.linalg.matrix_norm(step - B @ R @ A).item()
    expected = math.sqrt((S[rank:] ** 2).sum().item())
    assert math.isclose(error, expected, rel_tol=1e-8, abs_tol=1e-14)
    assert max_abs(B.T @ B - torch.eye(rank, dtype=F64)) <= 1e-10
    assert max_abs(A @ A.T - torch.eye(rank, dtype=F64)) <= 1e-10


def test_lora_sb_factors_preserve_norm():
    # Prepare: ||B X A||_F = ||X||_F because B and A^T have orthonormal columns
    gen = torch.Generator().manual_seed(9)
    rank = 5
    B, _, A = lora_sb_init(torch.randn(48, 40, generator=gen, dtype=F64), rank, 1e-3)
    X = torch.randn(rank, rank, generator=gen, dtype=F64)

    # Execute
    lifted = torch.linalg.matrix_norm(B @ X @ A).item()

    # Assert
    assert math.isclose(lifted, torch.linalg.matrix_norm(X).item(), rel_tol=1e-12)


@pytest.mark.parametrize("shape,rank", [((48, 40), 41), ((5, 9), 6), ((3, 3), 4)])
def test_lora_sb_init_rejects_rank_above_min_dimension(shape, rank):
    # Prepare
    G = torch.ones(shape, dtype=F64)

    # Execute / Assert
    with pytest.raises(ValueError, match=f"rank {rank} exceeds"):
        lora_sb_init(G, rank, 1e-3)


def test_lora_sb_init_from_two_clients_gradients_equals_pooled():
    # Prepare: per-example gradients of 10 examples, split over two clients
    gen = torch.Generator().manual_seed(10)
    per_example = torch.randn(10, 48, 40, generator=gen, dtype=F64)
    pooled = per_example.sum(0)
    client_1, client_2 = per_example[:5].sum(0), per_example[5:].sum(0)
    rank = 4

    # Execute
    B_fed, R_fed, A_fed = lora_sb_init(torch.stack([client_1, client_2]).sum(0), rank, 1e-3)
    B_pool, R_pool, A_pool = lora_sb_init(pooled, rank, 1e-3)

    # Assert
    assert torch.equal(torch.sign(client_1 + client_2), torch.sign(pooled))
    assert max_abs(R_fed - R_pool) <= 1e-12
    assert max_abs(B_fed @ R_fed @ A_fed - B_pool @ R_pool @ A_pool) <= 1e-12
    # The factors themselves agree up to a per-component sign.
    signs = torch.sign((B_fed * B_pool).sum(0))
    assert max_abs(B_fed - B_pool * signs) <= 1e-10
    assert max_abs(A_fed - A_pool * signs[:, None]) <= 1e-10


# --------------------------------------------------------------------------------------------
# The registered strategies' aggregate() on top of these functions


def make_strategy(name: str):
    from fedlora.config import RunConfig
    from fedlora.strategies import get_strategy

    cfg = RunConfig.from_dict({"strategy": name, "clients": 4, "clients_per_round": 3})
    return get_strategy(name).from_config(cfg, frozenset({"classifier.weight", "classifier.bias"}))


def test_fedit_strategy_aggregate_is_identity_for_identical_clients():
    # Prepare
    strategy = make_strategy("fedavg")
    gen = torch.Generator().manual_seed(11)
    state = {"l.lora_A.weight": torch.randn(4, 40, generator=gen, dtype=F64),
             "l.lora_B.weight": torch.randn(48, 4, generator=gen, dtype=F64),
             "classifier.weight": torch.randn(3, 40, generator=gen, dtype=F64),
             "classifier.bias": torch.randn(3, generator=gen, dtype=F64)}
    updates = [{k: v.clone() for k, v in state.items()} for _ in range(3)]

    # Execute
    new_state = strategy.aggregate(state, updates, sample_weights([5, 17, 2]))

    # Assert
    assert set(new_state) == set(state)
    for key in state:
        assert max_abs(new_state[key] - state[key]) <= 1e-14


def test_fedsb_strategy_aggregate_is_exact_and_keeps_factors():
    # Prepare
    strategy = make_strategy("fedsb")
    gen = torch.Generator().manual_seed(12)
    B, _, A = lora_sb_init(torch.randn(48, 40, generator=gen, dtype=F64), 4, 1e-3)
    state = {"l.lora_A.weight": A, "l.lora_B.weight": B,
             "l.lora_R.weight": torch.eye(4, dtype=F64),
             "classifier.bias": torch.zeros(3, dtype=F64)}
    updates = [{"l.lora_R.weight": torch.randn(4, 4, generator=gen, dtype=F64),
                "classifier.bias": torch.randn(3, generator=gen, dtype=F64)} for _ in range(3)]
    weights = sample_weights([3, 9, 12])

    # Execute
    new_state = strategy.aggregate(state, updates, weights)

    # Assert
    assert strategy.trained_parts == ("R", "head")
    assert new_state["l.lora_A.weight"] is A and new_state["l.lora_B.weight"] is B
    expected = sum(w * (B @ u["l.lora_R.weight"] @ A) for w, u in zip(weights, updates))
    assert max_abs(B @ new_state["l.lora_R.weight"] @ A - expected) <= 1e-12
