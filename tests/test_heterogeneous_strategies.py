"""Clients of different ranks (``client_ranks``) through the strategies: what each client is sent
and sends back at its own rank, bytes = the method's formula per client rank, FLoRA's,
FlexLoRA's and HetLoRA's aggregates against references computed here from the replies (float64,
``tests.federation``: two non-square 6 x 5 layers; ranks 1, 2 and 4, so partitions 0..3 train at
1, 2, 4 and 1), the equal-rank limits, and the methods that refuse different ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.aggregation.heterogeneous import sparsity_weights, truncated_factors
from fedlora.core.errors import ConfigError
from fedlora.model.adapters import factor_key, part_of, state_at_rank
from fedlora.report.comm import CommLedger, expected_params, message_part
from fedlora.strategies import STRATEGIES
from tests.federation import CLIENTS, HEAD_KEYS, LAYERS, M, N, SCALE, Federation, reply

pytestmark = pytest.mark.usefixtures("flower_task")

RANKS = [1, 2, 4]  # partition p trains at RANKS[p % 3]: 1, 2, 4, 1
HEAD_PARAMS = 3 * N + 3
SUPPORTED = sorted(name for name, cls in STRATEGIES.items() if cls.rank_rule is not None)
REFUSED = sorted(set(STRATEGIES) - set(SUPPORTED))


def client_rank(node: int) -> int:
    return RANKS[(node - 100) % len(RANKS)]


def tensors(message) -> dict[str, torch.Tensor]:
    return message.content["arrays"].to_torch_state_dict()


def params(message) -> int:
    return sum(int(np.prod(a.shape)) for a in message.content["arrays"].values())


def dense_mean(fed, messages, weights) -> dict[str, torch.Tensor]:
    """``sum_k w_k s B_k A_k`` per layer, from the clients' replies (m x n, float64)."""
    return {layer: sum(w * SCALE * fed.clients[m.metadata.dst_node_id].update[factor_key(layer, "B")]
                       @ fed.clients[m.metadata.dst_node_id].update[factor_key(layer, "A")]
                       for m, w in zip(messages, weights)) for layer in LAYERS}


def test_the_methods_with_and_without_a_rule_for_different_ranks():
    # Assert: the list; every other method refuses client_ranks
    assert SUPPORTED == ["fedavg", "fedex", "fedsvd", "ffa", "flexlora", "flora", "hetlora",
                         "lorafair", "rolora"]
    assert REFUSED == ["fedsb"]


@pytest.mark.parametrize("name", SUPPORTED)
def test_each_client_is_sent_and_returns_its_own_rank_and_bytes_follow_the_formula(name):
    # Prepare: round 2 is a steady-state round (every client took part in round 1)
    fed = Federation(name, client_ranks=RANKS)
    fed.run_round()
    cls = STRATEGIES[name]
    ledger = CommLedger(lambda key: message_part(key, HEAD_KEYS))

    # Execute
    messages, replies = fed.run_round()
    ledger.record(2, "down", messages, cls.one_time_parts_down)
    ledger.record(2, "up", replies, cls.one_time_parts_down)

    # Assert: the config names the client's rank, every factor sent or returned has it, and
    # the parameters are the method's formula at that rank, summed over the round's clients
    formulas = [expected_params(cls, [(M, N)] * len(LAYERS), client_rank(m.metadata.dst_node_id),
                                HEAD_PARAMS, server_round=2) for m in messages]
    for message, answer, formula in zip(messages, replies, formulas):
        rank = client_rank(message.metadata.dst_node_id)
        assert message.content["config"]["client-rank"] == rank
        for key, tensor in {**tensors(message), **tensors(answer)}.items():
            part = part_of(key, HEAD_KEYS)
            if part in ("A", "B"):
                assert tensor.shape == ((rank, N) if part == "A" else (M, rank)), key
        assert (params(message), params(answer)) == (formula["down"], formula["up"])
    assert ledger.round_bytes(2, "down") == sum(f["down"] for f in formulas) * 8
    assert ledger.round_bytes(2, "up") == sum(f["up"] for f in formulas) * 8


@pytest.mark.parametrize("name", [n for n in SUPPORTED if STRATEGIES[n].rank_rule == "pad"])
def test_padding_methods_send_the_first_components_of_the_global_factors(name):
    # Prepare
    fed = Federation(name, client_ranks=RANKS)
    fed.run_round()
    state = fed.state

    # Execute
    messages, _ = fed.run_round()

    # Assert: a factor a client is sent is the global one truncated to its rank, and the
    # global one keeps the largest rank
    for message in messages:
        rank = client_rank(message.metadata.dst_node_id)
        for key, tensor in tensors(message).items():
            if part_of(key, HEAD_KEYS) in ("A", "B"):
                assert torch.equal(tensor, state_at_rank({key: state[key]}, rank)[key])
    assert all(fed.state[factor_key(layer, "A")].shape == (4, N) for layer in LAYERS)


@pytest.mark.parametrize("name", [n for n in SUPPORTED if STRATEGIES[n].exact])
def test_exact_methods_stay_exact_with_different_ranks(name):
    # Prepare: 3 of 4 clients a round; B_0 = 0 (LoRA's init), so every client starts from the
    # global model's product, whatever its rank
    fed = Federation(name, client_ranks=RANKS, clients_per_round=3, weighting="fedau")
    for key in list(fed.initial):
        if part_of(key, HEAD_KEYS) == "B":
            fed.initial[key] = torch.zeros_like(fed.initial[key])
    fed.arrays = type(fed.arrays)(fed.initial)
    for _ in range(3):
        before = fed.global_effective_weights()
        messages = fed.configure()
        replies = fed.train(messages)
        clients = [fed.clients[m.metadata.dst_node_id].effective_weights(fed.W0) for m in messages]
        coefficients = fed.reference_coefficients([m.metadata.dst_node_id - 100 for m in messages])

        # Execute
        fed.aggregate(replies)

        # Assert: W_t+1 = W_t + sum_k c_k (W_k - W_t) on the effective weights
        result = fed.global_effective_weights()
        for layer in LAYERS:
            expected = before[layer] + sum(c * (w[layer] - before[layer])
                                           for c, w in zip(coefficients, clients))
            assert (result[layer] - expected).abs().max() <= 1e-12


def test_flora_merges_the_exact_weighted_sum_of_the_clients_products():
    # Prepare
    fed = Federation("flora", client_ranks=RANKS, flora={"stack": "factored"})
    fed.run_round()
    delta_before = fed.strategy.global_base_delta()
    messages = fed.configure()
    replies = fed.train(messages)
    weights = fed.reference_coefficients([m.metadata.dst_node_id - 100 for m in messages])

    # Execute
    fed.aggregate(replies)

    # Assert: the base moves by sum_k w_k s B_k A_k - s B_0 A_0 (the fresh adapters' start),
    # to 1e-12, and the global adapter stays at the seed
    expected = dense_mean(fed, messages, weights)
    for layer in LAYERS:
        B0, A0 = fed.initial[factor_key(layer, "B")], fed.initial[factor_key(layer, "A")]
        moved = fed.strategy.global_base_delta()[layer] - delta_before[layer]
        assert (moved - (expected[layer] - SCALE * B0 @ A0)).abs().max() <= 1e-12
        assert torch.equal(fed.state[factor_key(layer, "B")], B0)
    # the next message's stack is Sigma_j r_j (m + n) per layer (and the B_0 term)
    stacked = sum(int(np.prod(a.shape)) for k, a in fed.configure()[0].content["arrays"].items()
                  if message_part(k, HEAD_KEYS) == "residual")
    assert stacked == len(LAYERS) * (sum(client_rank(m.metadata.dst_node_id) for m in messages) + 4) * (M + N)


def test_flora_client_that_missed_rounds_gets_every_stack_it_missed():
    # Prepare: partition 3 sits out rounds 3 and 4 (it added round 1's stack in round 2)
    fed = Federation("flora", client_ranks=RANKS)
    nodes = sorted(fed.clients)
    fed.strategy.sample = lambda server_round: nodes if server_round in (1, 2, 5) else nodes[:3]
    for _ in range(4):
        fed.run_round()

    # Execute
    messages, _ = fed.run_round()

    # Assert: it catches up on the stacks of rounds 2, 3 and 4 at once, and then holds the
    # server's base delta as it was before round 5's stack
    config = messages[3].content["config"]
    assert (config["residual-from"], config["residual-to"]) == (1, 4)
    late = fed.clients[nodes[3]]
    for layer in LAYERS:
        server = fed.strategy.base_delta[layer] - fed.strategy.residuals[-1][layer][0] @ \
            fed.strategy.residuals[-1][layer][1]
        assert (late.base_delta[layer] - server).abs().max() <= 1e-12


def test_flexlora_gives_each_tier_the_best_factorisation_of_the_aggregate():
    # Prepare
    fed = Federation("flexlora", client_ranks=RANKS)
    messages = fed.configure()
    replies = fed.train(messages)
    weights = fed.reference_coefficients([m.metadata.dst_node_id - 100 for m in messages])

    # Execute
    fed.aggregate(replies)
    downloads = fed.configure()

    # Assert: the global factors are truncated_factors' at the largest rank; each client is
    # sent the factors of the best rank-r approximation (Eckart-Young, against a dense SVD)
    dense = dense_mean(fed, messages, weights)
    errors = dict.fromkeys(RANKS, 0.0)
    for layer in LAYERS:
        B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
        updates = [fed.clients[m.metadata.dst_node_id].update for m in messages]
        reference = truncated_factors([u[B_key] for u in updates], [u[A_key] for u in updates],
                                      weights, [SCALE] * len(updates), RANKS,
                                      dict.fromkeys(RANKS, SCALE))
        assert torch.equal(fed.state[B_key], reference[4][0]) and torch.equal(fed.state[A_key], reference[4][1])
        S = torch.linalg.svdvals(dense[layer])
        for message in downloads:
            rank = client_rank(message.metadata.dst_node_id)
            B, A = tensors(message)[B_key], tensors(message)[A_key]
            assert torch.equal(B, reference[rank][0]) and torch.equal(A, reference[rank][1])
            assert float(torch.linalg.norm(dense[layer] - SCALE * B @ A)) == \
                pytest.approx(float(S[rank:].square().sum().sqrt()), rel=1e-9, abs=1e-12)
        for rank in RANKS:
            errors[rank] += float(S[rank:].square().sum())
    logged = fed.strategy.round_metrics()["truncation_error"]
    assert {int(r): e for r, e in logged.items()} == pytest.approx(
        {r: math.sqrt(e) for r, e in errors.items()}, rel=1e-9, abs=1e-12)


def test_hetlora_pads_weights_by_sparsity_and_truncates():
    # Prepare
    fed = Federation("hetlora", client_ranks=RANKS)
    messages = fed.configure()
    replies = fed.train(messages)
    coefficients = fed.reference_coefficients([m.metadata.dst_node_id - 100 for m in messages])
    updates = [fed.clients[m.metadata.dst_node_id].update for m in messages]

    # Execute
    fed.aggregate(replies)

    # Assert: per layer, B = sum_k p_k pad(B_k) and A likewise, with the sparsity weights of
    # the paper (||s B_k A_k||_F normalised); the head by the run's weights
    for layer in LAYERS:
        B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
        norms = [float(torch.linalg.norm(SCALE * u[B_key] @ u[A_key])) for u in updates]
        p = [v / sum(norms) for v in norms]
        assert p == pytest.approx(sparsity_weights([u[B_key] for u in updates],
                                                   [u[A_key] for u in updates]), rel=1e-12)
        padded_B = [torch.cat([u[B_key], torch.zeros(M, 4 - u[B_key].shape[1], dtype=torch.float64)], 1)
                    for u in updates]
        padded_A = [torch.cat([u[A_key], torch.zeros(4 - u[A_key].shape[0], N, dtype=torch.float64)], 0)
                    for u in updates]
        assert (fed.state[B_key] - sum(w * b for w, b in zip(p, padded_B))).abs().max() <= 1e-15
        assert (fed.state[A_key] - sum(w * a for w, a in zip(p, padded_A))).abs().max() <= 1e-15
    head = sum(c * u["head.weight"] for c, u in zip(coefficients, updates))
    assert (fed.state["head.weight"] - head).abs().max() <= 1e-15


def test_hetlora_client_that_prunes_is_truncated_and_sent_its_new_rank():
    # Prepare: the rank-4 client (partition 2) reports that it pruned to rank 3
    fed = Federation("hetlora", client_ranks=RANKS)
    messages = fed.configure()
    replies = fed.train(messages)
    pruned = fed.clients[102]
    replies[2] = reply(messages[2], pruned.update, pruned.num_examples, **{"next-rank": 3})

    # Execute
    report = fed.strategy.aggregate_train(1, replies)
    fed.arrays = report.arrays
    following = fed.configure()

    # Assert: its 4th component did not enter the aggregate; it trains at rank 3 from now on
    twin = Federation("hetlora", client_ranks=RANKS)
    twin_messages = twin.configure()
    twin_replies = twin.train(twin_messages)
    cut = state_at_rank(twin.clients[102].update, 3)
    twin_replies[2] = reply(twin_messages[2], state_at_rank(cut, 4), pruned.num_examples)
    expected = twin.strategy.aggregate_train(1, twin_replies).arrays.to_torch_state_dict()
    assert report.clients_trained == CLIENTS and not report.rejected
    assert all(torch.equal(fed.state[k], expected[k]) for k in expected)
    assert fed.strategy.client_rank(2) == 3 and following[2].content["config"]["client-rank"] == 3
    assert tensors(following[2])[factor_key(LAYERS[0], "A")].shape == (3, N)
    assert fed.strategy.round_metrics()["rank_counts"] == {"3": 1, "2": 1, "1": 2}


@pytest.mark.parametrize("value", [0, 5, 2.5, -1])
def test_a_next_rank_outside_one_to_the_client_rank_is_rejected(value):
    # Prepare
    fed = Federation("hetlora", client_ranks=RANKS)
    messages = fed.configure()
    replies = fed.train(messages)
    replies[2] = reply(messages[2], fed.clients[102].update, 30, **{"next-rank": value})

    # Execute
    report = fed.strategy.aggregate_train(1, replies)

    # Assert
    assert [node for node, _ in report.rejected] == [102]
    assert "next-rank" in report.rejected[0][1] and fed.strategy.client_rank(2) == 4


def test_equal_ranks_reduce_each_method_to_its_homogeneous_maths():
    # Prepare: every client at rank 2 (client_ranks=[2]) against the homogeneous runs
    def after_one_round(name, **settings):
        fed = Federation(name, **settings)
        messages, _ = fed.run_round()
        return fed, messages

    # Zero-padded FedIT is FedIT, bit for bit
    padded, _ = after_one_round("fedavg", client_ranks=[2])
    plain, _ = after_one_round("fedavg")
    assert all(torch.equal(padded.state[k], plain.state[k]) for k in plain.state)
    # HetLoRA with the run's weights and no pruning is FedIT, bit for bit
    hetlora, _ = after_one_round("hetlora", client_ranks=[2],
                                 hetlora={"weights": "clients", "prune": False})
    assert all(torch.equal(hetlora.state[k], plain.state[k]) for k in plain.state)
    # FLoRA's global model is FedEx-LoRA's (both W_t + sum_k c_k (W_k - W_t)), to 1e-12
    flora, _ = after_one_round("flora", client_ranks=[2])
    fedex, _ = after_one_round("fedex")
    for layer, weight in flora.global_effective_weights().items():
        assert (weight - fedex.global_effective_weights()[layer]).abs().max() <= 1e-12
    # FlexLoRA is the rank-2 SVD truncation of the exact mean of the products (not FedIT)
    flex, messages = after_one_round("flexlora", client_ranks=[2])
    weights = flex.reference_coefficients([m.metadata.dst_node_id - 100 for m in messages])
    for layer, dense in dense_mean(flex, messages, weights).items():
        U, S, Vh = torch.linalg.svd(dense)
        product = SCALE * flex.state[factor_key(layer, "B")] @ flex.state[factor_key(layer, "A")]
        assert (product - U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]).abs().max() <= 1e-12
        assert (product - SCALE * plain.state[factor_key(layer, "B")]
                @ plain.state[factor_key(layer, "A")]).abs().max() > 1e-3


@pytest.mark.parametrize("name", REFUSED)
def test_methods_without_a_rule_refuse_client_ranks_in_one_line(name):
    with pytest.raises(ConfigError) as error:
        Federation(name, client_ranks=RANKS)
    message = str(error.value)
    assert "\n" not in message and f"strategy={name}" in message and "client_ranks" in message


@pytest.mark.parametrize("raw, message", [
    ({"client_ranks": [2, 0]}, "not a list of positive integers"),
    ({"client_ranks": "2,x"}, r"client_ranks\[1\]: Value 'x'"),  # the schema's one line
    ({"client_ranks": [2, 4], "rank": 8}, "drop rank or set rank=4"),
])
def test_bad_client_ranks_are_one_line_errors(raw, message):
    from fedlora.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"strategy": "fedavg", **raw})


def test_client_ranks_read_from_a_run_config_string_and_set_the_global_rank_and_scale():
    from fedlora.config import RunConfig

    cfg = RunConfig.from_dict({"strategy": "flexlora", "client_ranks": "[2, 4,8,16]"})
    assert cfg.client_ranks == (2, 4, 8, 16) and cfg.rank == 16 and cfg.alpha == 32.0
    assert RunConfig.from_saved(cfg.to_dict()).client_ranks == (2, 4, 8, 16)


def test_hetlora_pruning_refuses_record_level_dp_in_one_line():
    from fedlora.config import RunConfig

    raw = {"strategy": "hetlora", "client_ranks": [2, 4], "dp": {"epsilon": 3.0}}
    with pytest.raises(ConfigError, match="hetlora.prune=true with record-level DP"):
        RunConfig.from_dict(raw)
    assert not RunConfig.from_dict({**raw, "hetlora": {"prune": False}}).settings.prune


def test_a_pruned_rank_survives_a_server_restart():
    # Prepare: partition 2 prunes to rank 3 in round 1
    fed = Federation("hetlora", client_ranks=RANKS)
    messages = fed.configure()
    replies = fed.train(messages)
    replies[2] = reply(messages[2], fed.clients[102].update, 30, **{"next-rank": 3})
    fed.arrays = fed.strategy.aggregate_train(1, replies).arrays

    # Execute: a new strategy loads the state (a restart)
    restarted = Federation("hetlora", client_ranks=RANKS).strategy
    restarted.load_state_dict(fed.strategy.state_dict())

    # Assert
    assert [restarted.client_rank(p) for p in range(CLIENTS)] == [1, 2, 3, 1]


@pytest.mark.parametrize("strategy", ["fedavg", "flora", "flexlora", "hetlora"])
def test_killed_and_resumed_run_with_client_ranks_equals_an_uninterrupted_one(strategy, tmp_path):
    from fedlora.run.checkpoint import FINAL_ADAPTER
    from fedlora.run.server import run_server
    from tests.test_resume import Killed, SeededGrid, fresh_clients, make_run, rows_of, without_timing
    from tests.test_server_loop import make_tiny_bundle

    # Prepare: ranks 1 and 2 (the tiny model's adapters have rank 2)
    cfg, data = make_run(strategy, client_ranks=[1, 2])
    bundle = make_tiny_bundle()
    run_server(SeededGrid(fresh_clients(bundle, 100)), cfg, tmp_path / "reference", bundle, data)

    # Execute: killed in round 6, resumed on new nodes
    bundle = make_tiny_bundle()
    with pytest.raises(Killed):
        run_server(SeededGrid(fresh_clients(bundle, 100), kill_in=6), cfg, tmp_path / "run",
                   bundle, data)
    bundle = make_tiny_bundle()
    run_server(SeededGrid(fresh_clients(bundle, 500)), cfg, tmp_path / "run", bundle, data,
               resume=True)

    # Assert: the same rows (tiers included) and the same final adapter, bit for bit
    rows = without_timing(rows_of(tmp_path / "run"))
    assert rows == without_timing(rows_of(tmp_path / "reference"))
    assert all(set(row["tiers"]) == {"1", "2"} for row in rows)
    final, expected = (torch.load(tmp_path / d / FINAL_ADAPTER)["adapter"] for d in ("run", "reference"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_a_client_that_prunes_in_a_run_of_equal_ranks_is_told_its_new_rank():
    # Prepare: HetLoRA at rank 2 for everyone (no client_ranks); partition 1 prunes to 1
    fed = Federation("hetlora")
    messages = fed.configure()
    replies = fed.train(messages)
    assert all("client-rank" not in m.content["config"] for m in messages)
    replies[1] = reply(messages[1], fed.clients[101].update, 20, **{"next-rank": 1})
    fed.arrays = fed.strategy.aggregate_train(1, replies).arrays

    # Execute
    following = fed.configure()
    fed.train(following)

    # Assert: its message names rank 1 and carries rank-1 factors; the others are unchanged
    assert following[1].content["config"]["client-rank"] == 1
    assert tensors(following[1])[factor_key(LAYERS[0], "B")].shape == (M, 1)
    assert "client-rank" not in following[0].content["config"]
    assert fed.clients[101].update[factor_key(LAYERS[0], "A")].shape == (1, N)
