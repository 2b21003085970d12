"""One behaviour matrix over every registered strategy (``fedlora.strategies.STRATEGIES``).

A new method inherits all of it by registering. Everything runs on tiny hand-made float64
states (``tests.federation``: two non-square 6 x 5 layers, rank 2, a 3-label head) with fake
clients answering real Flower messages, so each test takes milliseconds:

* exactness where the paper promises it (ALGORITHMS.md invariants 1-5): the global effective
  weight ``W0 + base delta + s B [R] A`` after a round equals ``W_t + eta sum_k c_k (W_k - W_t)``
  of the clients' effective weights, under every weighting;
* every client starts from the global model (frozen A identical everywhere, FedEx catch-up);
* frozen tensors bit-identical; each payload holds exactly what its client lacks, derived from
  the method's declarations (``trained_parts_in``/``trained_parts``, ``kept_parts``,
  ``seeded_parts``, ``one_time_parts_down``, its base delta), never from a per-method table;
* bad updates (extra/missing keys, NaN/Inf, shape, dtype) rejected, the global state unchanged;
* ``state_dict`` round-trip; measured parameters = ``params_up`` / ``params_down``;
* weighting (samples, uniform, FedAU, server_lr) and participation patterns, once for all.
"""

from __future__ import annotations

import copy
import io
import json
import sys

import numpy as np
import pytest
import torch

from fedlora.model.adapters import factor_key, part_of, residual_key, split_residual_key
from fedlora.report.comm import CommLedger, expected_params, message_part
from fedlora.aggregation.participation import Bernoulli, Cyclic, Markov, participation_probabilities
from fedlora.strategies import STRATEGIES, FederatedLoRA, FedIT
from tests.federation import (CLIENTS, F64, HEAD_KEYS, HISTOGRAMS, LAYERS, M, N, RANK, Federation,
                              reply)

pytestmark = pytest.mark.usefixtures("flower_task")

NAMES = list(STRATEGIES)
HEAD_PARAMS = 3 * N + 3


def trained_in(strategy, server_round: int) -> tuple[str, ...]:
    """The parts clients train in ``server_round``: the method's own ``trained_parts_in`` (a
    method whose parts alternate by round), else its class attribute ``trained_parts``."""
    per_round = getattr(strategy, "trained_parts_in", None)
    return tuple(per_round(server_round)) if per_round is not None else tuple(strategy.trained_parts)


def declared_below_base(cls, attribute: str) -> bool:
    """Whether the method (or a method it extends) declares ``attribute`` itself, rather than
    inheriting FederatedLoRA's placeholder."""
    return any(attribute in vars(c) for c in cls.__mro__[:cls.__mro__.index(FederatedLoRA)])


def max_error(result: dict, expected: dict) -> float:
    return max((result[k] - expected[k]).abs().max().item() for k in expected)


def relative_error(result: dict, expected: dict) -> float:
    return max(((result[k] - expected[k]).norm() / expected[k].norm()).item() for k in expected)


def delta_rule(before: dict, clients: list[dict], coefficients: list[float], server_lr: float) -> dict:
    """``x + eta sum_k c_k (x_k - x)``, literally."""
    return {k: before[k] + server_lr * sum(c * (x[k] - before[k]) for c, x in zip(coefficients, clients))
            for k in before}


def sampled_partitions(messages) -> list[int]:
    return [m.metadata.dst_node_id - 100 for m in messages]


def states_equal(a, b) -> bool:
    """Recursive equality of state dicts (tensors bit-identical)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


# --------------------------------------------------------------------------------------------
# Exactness and the clients' starting point


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_states_its_parts_and_formulas(name):
    # Prepare
    cls = STRATEGIES[name]
    strategy = Federation(name).strategy

    # Assert: the registry's classes are complete (a method that declares nothing fails here)
    assert cls.name == name and issubclass(cls, FederatedLoRA)
    for attribute in ("trained_parts", "params_up", "params_down"):
        assert declared_below_base(cls, attribute), f"{name} does not declare {attribute}"
    assert isinstance(cls.exact, bool)
    parts = {"A", "B", "R", "head"}
    for server_round in range(1, 5):
        trained = trained_in(strategy, server_round)
        assert trained and set(trained) <= parts and "head" in trained, (server_round, trained)
    assert cls.one_time_parts_down <= cls.kept_parts <= parts  # sent once, so kept
    # A seeded part that training can change must be kept, so a client learns its new value.
    assert cls.seeded_parts <= parts and not (cls.seeded_parts - cls.kept_parts) & set(cls.trained_parts)
    assert cls.params_up(M, N, RANK) > 0 and cls.params_down(M, N, RANK) > 0
    assert "arXiv" in sys.modules[cls.__module__].__doc__ or name == "fedavg"  # cites its paper


@pytest.mark.parametrize("weighting,server_lr", [("samples", 1.0), ("uniform", 0.5), ("fedau", 1.0),
                                                 ("fedau", 1.7)])
@pytest.mark.parametrize("name", NAMES)
def test_exact_methods_aggregate_the_clients_effective_weights(name, weighting, server_lr):
    # Prepare: 3 of 4 clients per round, so clients skip rounds (FedEx catch-up, FedSVD's A)
    fed = Federation(name, clients_per_round=3, weighting=weighting, server_lr=server_lr)
    rounds_checked = 0
    for _ in range(4):
        before = fed.global_effective_weights()
        messages = fed.configure()
        replies = fed.train(messages)
        clients = [fed.clients[m.metadata.dst_node_id].effective_weights(fed.W0) for m in messages]
        coefficients = fed.reference_coefficients(sampled_partitions(messages))

        # Execute
        fed.aggregate(replies)

        # Assert: W0' + s B [R] A == W_t + eta sum_k c_k (W_k - W_t) on both non-square
        # 6 x 5 layers in every round, where the paper promises it (``exact``); elsewhere the
        # factors' cross-covariance leaves a gap
        expected = delta_rule(before, clients, coefficients, server_lr)
        result = fed.global_effective_weights()
        if STRATEGIES[name].exact:
            assert max_error(result, expected) <= 1e-12
            assert relative_error(result, expected) <= 1e-12
        else:
            assert max_error(result, expected) > 1e-4
        rounds_checked += 1
    assert rounds_checked >= 2


@pytest.mark.parametrize("objective,lam", [("ls", 0.01), ("cos", 0.01), ("cos", 1e-4)])
def test_lorafair_is_never_further_from_the_clients_mean_product_than_fedit(objective, lam):
    # Prepare: the same replies aggregated by LoRA-FAIR and by FedIT
    fed = Federation("lorafair", lorafair={"objective": objective, "lam": lam})
    fedit = FedIT.from_config(fed.cfg, HEAD_KEYS)
    fedit.register_nodes({node: c.partition_id for node, c in fed.clients.items()})
    state = fed.state
    messages = fed.configure()
    fedit.configure_train(1, fed.arrays, {}, None)
    replies = fed.train(messages)
    coefficients = fed.reference_coefficients(sampled_partitions(messages))
    targets = {layer: sum(c * fed.clients[m.metadata.dst_node_id].update[factor_key(layer, "B")]
                          @ fed.clients[m.metadata.dst_node_id].update[factor_key(layer, "A")]
                          for c, m in zip(coefficients, messages)) for layer in LAYERS}

    # Execute
    fed.aggregate(replies)
    fedit_state = fedit.aggregate_train(1, replies)[0].to_torch_state_dict()

    # Assert: A and the head are FedIT's; only B moves, towards dW* = E_w[B_k A_k]
    for layer in LAYERS:
        B, A = fed.state[factor_key(layer, "B")], fed.state[factor_key(layer, "A")]
        B_fedit = fedit_state[factor_key(layer, "B")]
        assert torch.equal(A, fedit_state[factor_key(layer, "A")])
        if lam < 0.01 or objective == "ls":  # (at lam = 0.01 the cosine may already be optimal)
            assert not torch.equal(B, B_fedit)
        target = targets[layer]
        if objective == "ls":
            assert (target - B @ A).norm() <= (target - B_fedit @ A).norm()
        else:
            cosine = torch.nn.functional.cosine_similarity
            assert cosine((B @ A).flatten(), target.flatten(), dim=0) >= \
                cosine((B_fedit @ A).flatten(), target.flatten(), dim=0)
    assert torch.equal(fed.state["head.weight"], fedit_state["head.weight"])
    assert not torch.equal(state[factor_key(LAYERS[0], "B")], fed.state[factor_key(LAYERS[0], "B")])


@pytest.mark.parametrize("name", NAMES)
def test_every_client_starts_from_the_global_model(name):
    # Prepare: 2 of 4 clients per round over 6 rounds: most clients miss rounds
    fed = Federation(name, clients_per_round=2)
    skipped = 0
    for _ in range(6):
        state, base_delta = fed.state, fed.strategy.global_base_delta() or {}

        # Execute
        messages, _ = fed.run_round()

        # Assert: every tensor the client trained from is the server's, bit for bit (frozen A
        # included), and its base weight is the server's (FedEx: after catching up)
        for message in messages:
            client = fed.clients[message.metadata.dst_node_id]
            assert states_equal(client.trained_from, state)
            assert client.base_delta.keys() == base_delta.keys()
            for layer in base_delta:
                assert (client.base_delta[layer] - base_delta[layer]).abs().max() <= 1e-12
            config = message.content["config"]
            skipped = max(skipped, int(config.get("residual-to", 0)) - int(config.get("residual-from", 0)))
    if name == "fedex":
        assert skipped >= 2  # some client caught up on two or more missed rounds at once


@pytest.mark.parametrize("lost", ["reply", "message"])
@pytest.mark.parametrize("name", NAMES)
def test_a_client_whose_round_was_lost_still_starts_from_the_global_model(name, lost):
    # Prepare: round 3 loses one client's reply (after it stored what it was sent) or its
    # message (it never saw it); the client is sampled again in round 4
    fed = Federation(name)
    fed.run_round()
    fed.run_round()
    messages = fed.configure()
    node = messages[0].metadata.dst_node_id
    saved = copy.deepcopy(fed.clients[node])
    replies = fed.train(messages)
    if lost == "message":
        fed.clients[node] = saved
    fed.aggregate(replies[1:])
    state, base_delta = fed.state, fed.strategy.global_base_delta() or {}

    # Execute
    fed.run_round()

    # Assert
    client = fed.clients[node]
    assert states_equal(client.trained_from, state)
    assert client.base_delta.keys() == base_delta.keys()
    for layer in base_delta:
        assert (client.base_delta[layer] - base_delta[layer]).abs().max() <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_frozen_tensors_are_bit_identical_after_a_round(name):
    # Prepare
    fed = Federation(name, fedsvd={"period": 0})
    before = fed.state

    # Execute
    fed.run_round()

    # Assert: what clients do not train, the server does not change (FedSVD: with period 0);
    # a method that merges the trained factors into the base weights and restarts them from
    # the seed every round (FLoRA: seeded, kept and trained) keeps them at the seed, and its
    # base weights move instead
    cls = STRATEGIES[name]
    trained = trained_in(fed.strategy, 1)
    restarted = cls.seeded_parts & cls.kept_parts & set(trained) if cls.moves_base_weights else set()
    frozen = [k for k in before if part_of(k, HEAD_KEYS) not in set(trained) - restarted]
    assert frozen or set(trained) >= {"A", "B"}
    for key in frozen:
        assert torch.equal(fed.state[key], before[key]), key
    for key in set(before) - set(frozen):
        assert not torch.equal(fed.state[key], before[key]), key
    if restarted:
        assert all(delta.abs().max() > 0 for delta in fed.strategy.global_base_delta().values())


# --------------------------------------------------------------------------------------------
# What travels


def differs(held: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> bool:
    return held.keys() != current.keys() or any(not torch.equal(held[k], current[k]) for k in current)


@pytest.mark.parametrize("clients_per_round", [CLIENTS, 3])
@pytest.mark.parametrize("name", NAMES)
def test_payloads_hold_exactly_what_the_client_lacks(name, clients_per_round):
    # Prepare: what each node holds, tracked by the test from the messages alone and the
    # method's declarations: the seed's values of its ``seeded_parts``, what it received of
    # its ``kept_parts``, and (a method with a base delta) the server's delta when it last
    # trained. Everything else a node must be sent whenever it needs it.
    fed = Federation(name, clients_per_round=clients_per_round)
    cls = STRATEGIES[name]
    seeded = {k: v for k, v in fed.initial.items() if part_of(k, HEAD_KEYS) in cls.seeded_parts}
    held = {node: dict(seeded) for node in fed.clients}
    base_delta_held = {node: {} for node in fed.clients}
    one_time_sent = {node: set() for node in fed.clients}

    for _ in range(4):
        state = fed.state
        base_delta = fed.strategy.global_base_delta() or {}
        trained = set(trained_in(fed.strategy, fed.round + 1))

        # Execute
        messages, replies = fed.run_round()

        # Assert: the parts it trains, every frozen part it lacks or holds an old value of,
        # the residual if its base weight is behind; nothing else
        assert len(messages) == clients_per_round
        for message, answer in zip(messages, replies):
            node = message.metadata.dst_node_id
            lacking = {part_of(k, HEAD_KEYS) for k, v in state.items()
                       if not (k in held[node] and torch.equal(held[node][k], v))}
            # a trained part is its starting point: sent, unless the node keeps its current value
            starts = {p for p in trained if p not in cls.kept_parts}
            expected = starts | lacking | ({"residual"} if differs(base_delta_held[node], base_delta)
                                           else set())
            sent = {message_part(k, HEAD_KEYS) for k in message.content["arrays"]}
            assert sent == expected, (fed.round, node)
            assert not one_time_sent[node] & sent, "a one-time part travelled twice"
            config = message.content["config"]
            assert config["trained-parts"] == ",".join(trained_in(fed.strategy, fed.round))
            assert config["seeded-parts"] == ",".join(sorted(cls.seeded_parts))
            returned = {part_of(k, HEAD_KEYS) for k in answer.content["arrays"]}
            assert returned == trained
            # the node now holds what it was sent of the parts it keeps, and today's base
            received = message.content["arrays"].to_torch_state_dict()
            held[node].update({k: v for k, v in received.items()
                               if part_of(k, HEAD_KEYS) in cls.kept_parts})
            base_delta_held[node] = dict(base_delta)
            one_time_sent[node] |= sent & cls.one_time_parts_down


def test_residual_keys_never_collide_with_adapter_keys():
    # Execute
    keys = [residual_key(LAYERS[0]), residual_key(LAYERS[0], "_B"), residual_key(LAYERS[0], "_A")]

    # Assert
    assert [part_of(k, HEAD_KEYS) for k in keys] == [None] * 3
    assert [message_part(k, HEAD_KEYS) for k in keys] == ["residual"] * 3
    assert [split_residual_key(k) for k in keys] == [(LAYERS[0], ""), (LAYERS[0], "_B"), (LAYERS[0], "_A")]
    assert split_residual_key(factor_key(LAYERS[0], "B")) is None
    assert message_part(f"{LAYERS[0]}.base.weight", HEAD_KEYS) == "grad"


@pytest.mark.parametrize("name", NAMES)
def test_measured_parameters_equal_the_formulas(name):
    # Prepare: round 2 is a steady-state round (every client sampled in rounds 1 and 2)
    fed = Federation(name)
    fed.run_round()
    cls = STRATEGIES[name]
    formula = expected_params(cls, [(M, N)] * len(LAYERS), RANK, HEAD_PARAMS, server_round=2)
    ledger = CommLedger(lambda key: message_part(key, HEAD_KEYS))

    # Execute
    messages, replies = fed.run_round()
    ledger.record(2, "down", messages, cls.one_time_parts_down)
    ledger.record(2, "up", replies, cls.one_time_parts_down)

    # Assert: per client, and the ledger's bytes (float64: 8 bytes per parameter)
    def params(message):
        return sum(int(np.prod(a.shape)) for a in message.content["arrays"].values())

    assert [params(m) for m in messages] == [formula["down"]] * CLIENTS
    assert [params(r) for r in replies] == [formula["up"]] * CLIENTS
    assert ledger.round_bytes(2, "down") == CLIENTS * formula["down"] * 8
    assert ledger.round_bytes(2, "up") == CLIENTS * formula["up"] * 8
    assert ledger.params_up_per_client(2) == formula["up"]


def test_fedex_factored_residual_costs_k_plus_one_factor_pairs_and_equals_dense():
    # Prepare
    dense, factored = Federation("fedex"), Federation("fedex", fedex={"residual": "factored"})
    for fed in (dense, factored):
        fed.run_round()

    # Execute
    messages = factored.configure()
    factored.train(messages)
    dense.train(dense.configure())

    # Assert: (K + 1) r (m + n) per layer for the one missed round, K = 4 clients
    residual = sum(int(np.prod(a.shape)) for k, a in messages[0].content["arrays"].items()
                   if split_residual_key(k))
    assert residual == len(LAYERS) * (CLIENTS + 1) * RANK * (M + N)
    for node, client in factored.clients.items():
        for layer in LAYERS:
            assert (client.base_delta[layer] - dense.clients[node].base_delta[layer]).abs().max() <= 1e-12


def test_fedsvd_period_zero_is_ffa_bit_for_bit():
    # Prepare: same seed, same clients, same replies
    fedsvd, ffa = Federation("fedsvd", fedsvd={"period": 0}, clients_per_round=3), \
        Federation("ffa", clients_per_round=3)

    for _ in range(3):
        # Execute
        messages_svd, _ = fedsvd.run_round()
        messages_ffa, _ = ffa.run_round()

        # Assert
        assert states_equal(fedsvd.state, ffa.state)
        assert [dict(m.content["arrays"]).keys() for m in messages_svd] == \
            [dict(m.content["arrays"]).keys() for m in messages_ffa]


def test_refactorise_orthonormals_every_period_with_orthonormal_A():
    # Prepare: period 2, 2 of 4 clients per round
    fed = Federation("fedsvd", fedsvd={"period": 2}, clients_per_round=2)
    eye = torch.eye(RANK, dtype=F64)
    held = {node: 0 for node in fed.clients}  # version of A each client holds (0: seeded)

    for round_index in range(1, 7):
        A_before = {layer: fed.state[factor_key(layer, "A")] for layer in LAYERS}
        version = fed.strategy.a_version

        # Execute
        messages, _ = fed.run_round()

        # Assert: A changes only in even rounds, into orthonormal rows; it travels exactly to
        # the clients that do not hold the current one
        for layer in LAYERS:
            A = fed.state[factor_key(layer, "A")]
            assert torch.equal(A, A_before[layer]) == (round_index % 2 == 1)
            if round_index % 2 == 0:
                assert (A @ A.T - eye).abs().max() <= 1e-12
        for message in messages:
            node = message.metadata.dst_node_id
            sent_A = any(part_of(k, HEAD_KEYS) == "A" for k in message.content["arrays"])
            assert sent_A == (held[node] != version)
            held[node] = version
    assert fed.strategy.a_version == 3


def test_fedsvd_client_that_missed_a_refactorisation_receives_the_latest_A():
    # Prepare: two rounds with every client, then only the first, then only the last
    fed = Federation("fedsvd")
    fed.run_round()
    fed.run_round()  # every client receives A_1; the server moves to A_2
    nodes = sorted(fed.clients)
    late = nodes[-1]
    fed.strategy.sample = lambda server_round: [nodes[0]] if server_round == 3 else [late]

    # Execute
    fed.run_round()  # A_3, which the late client misses
    messages, _ = fed.run_round()

    # Assert: the late client is sent, and trains from, the server's current A
    assert fed.strategy.a_version == 4
    assert {part_of(k, HEAD_KEYS) for k in messages[0].content["arrays"]} == {"A", "B", "head"}
    for layer in LAYERS:
        key = factor_key(layer, "A")
        assert torch.equal(fed.clients[late].trained_from[key], fed.strategy.current[key])


# --------------------------------------------------------------------------------------------
# Rejected updates


def tamper(trained: tuple[str, ...], kind: str, update: dict) -> dict:
    update = dict(update)
    key = next(k for k in update if part_of(k, HEAD_KEYS) != "head")
    if kind == "extra":
        update[f"{LAYERS[0]}.base.weight"] = torch.zeros(M, N, dtype=F64)
    elif kind == "untrained":  # a frozen part the client must not send (or the head twice)
        frozen = [p for p in ("A", "B", "R") if p not in trained]
        extra = factor_key(LAYERS[0], frozen[0]) if frozen else "head.extra"
        update[extra] = torch.zeros(RANK, RANK, dtype=F64)
    elif kind == "missing":
        del update[key]
    elif kind in ("nan", "inf"):
        update[key] = update[key].clone()
        update[key][0, 0] = float(kind)
    elif kind == "shape":
        update[key] = torch.cat([update[key], update[key][:1]])
    elif kind == "dtype":
        update[key] = update[key].float()
    return update


@pytest.mark.parametrize("kind", ["extra", "untrained", "missing", "nan", "inf", "shape", "dtype"])
@pytest.mark.parametrize("name", NAMES)
def test_bad_updates_are_rejected_and_never_reach_the_global_state(name, kind):
    # Prepare: three good replies and one bad one; a twin strategy sees only the good ones
    fed = Federation(name)
    messages = fed.configure()
    replies = fed.train(messages)
    bad_message = messages[-1]
    bad = reply(bad_message, tamper(trained_in(fed.strategy, 1), kind,
                                    fed.clients[bad_message.metadata.dst_node_id].update),
                fed.clients[bad_message.metadata.dst_node_id].num_examples)
    twin = copy.deepcopy(fed.strategy)
    before = copy.deepcopy(fed.strategy.state_dict())

    # Execute
    with_bad_report = fed.strategy.aggregate_train(1, replies[:-1] + [bad])
    good_report = twin.aggregate_train(1, replies[:-1])
    with_bad, good_only = (r.arrays.to_torch_state_dict() for r in (with_bad_report, good_report))
    all_bad = copy.deepcopy(twin).aggregate_train(2, [bad])

    # Assert
    assert states_equal(with_bad, good_only)
    assert with_bad_report.client_reports == good_report.client_reports
    assert len(good_report.client_reports) == 3
    bad_node = bad_message.metadata.dst_node_id
    assert [node for node, _ in with_bad_report.rejected] == [bad_node] and not good_report.rejected
    assert tuple(all_bad) == (None, None) and [node for node, _ in all_bad.rejected] == [bad_node]
    assert before["partition_of"] == fed.strategy.state_dict()["partition_of"]


@pytest.mark.parametrize("name", NAMES)
def test_error_replies_and_zero_examples_are_rejected(name):
    # Prepare
    from flwr.app import Error, Message

    fed = Federation(name)
    messages = fed.configure()
    replies = fed.train(messages)
    failed = Message(Error(code=5, reason="node unavailable"), reply_to=messages[0])
    empty = reply(messages[1], fed.clients[messages[1].metadata.dst_node_id].update, 0)

    # Execute
    arrays, metrics = fed.aggregate([failed, empty] + replies[2:])

    # Assert
    assert metrics["clients_trained"] == CLIENTS - 2


# --------------------------------------------------------------------------------------------
# State round-trip


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name):
    # Prepare: FedAU weights and a Bernoulli participation model carry state too
    settings = {"weighting": "fedau", "participation": {"name": "bernoulli", "mean_p": 0.5}}
    fed = Federation(name, **settings)
    fed.run_round()
    fed.run_round()
    buffer = io.BytesIO()
    torch.save(fed.strategy.state_dict(), buffer)
    json.dumps(FederatedLoRA.state_dict(fed.strategy))  # the shared part is plain JSON

    # Execute: a fresh strategy, as after a restart
    restored = Federation(name, **settings).strategy
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    fed.round += 1
    messages = list(fed.strategy.configure_train(fed.round, fed.arrays, {}, None))
    restored_messages = list(restored.configure_train(fed.round, fed.arrays, {}, None))
    replies = fed.train(messages)
    result = fed.strategy.aggregate_train(fed.round, replies)
    restored_result = restored.aggregate_train(fed.round, replies)

    # Assert
    assert [m.metadata.dst_node_id for m in messages] == [m.metadata.dst_node_id for m in restored_messages]
    assert messages, "the seed should sample someone in round 3"
    for m, r in zip(messages, restored_messages):
        assert states_equal(m.content["arrays"].to_torch_state_dict(), r.content["arrays"].to_torch_state_dict())
        assert dict(m.content["config"]) == dict(r.content["config"])
    assert states_equal(result[0].to_torch_state_dict(), restored_result[0].to_torch_state_dict())
    assert states_equal(fed.strategy.state_dict(), restored.state_dict())


# --------------------------------------------------------------------------------------------
# Weighting: implemented once in the base class, so checked on the head of every method


@pytest.mark.parametrize("weighting,server_lr", [("samples", 1.0), ("samples", 0.5), ("uniform", 1.0),
                                                 ("uniform", 2.0), ("fedau", 1.0), ("fedau", 0.7)])
@pytest.mark.parametrize("name", NAMES)
def test_weights_apply_to_client_deltas(name, weighting, server_lr):
    # Prepare: 2 of 4 clients per round, so FedAU's weights move away from 1
    fed = Federation(name, clients_per_round=2, weighting=weighting, server_lr=server_lr,
                     fedau={"cutoff": 3})
    for _ in range(5):
        before = {k: fed.state[k] for k in HEAD_KEYS}
        messages = fed.configure()
        replies = fed.train(messages)
        heads = [{k: fed.clients[m.metadata.dst_node_id].update[k] for k in HEAD_KEYS} for m in messages]
        coefficients = fed.reference_coefficients(sampled_partitions(messages))

        # Execute
        _, metrics = fed.aggregate(replies)

        # Assert: head <- head + eta sum_k c_k (head_k - head)
        expected = delta_rule(before, heads, coefficients, server_lr)
        assert max_error({k: fed.state[k] for k in HEAD_KEYS}, expected) <= 1e-12
        assert metrics["client_weight_sum"] == pytest.approx(sum(coefficients))
    if weighting == "fedau":
        assert fed.strategy.fedau.state_dict() == fed.reference_fedau.state_dict()
        assert any(c != 1 / CLIENTS for c in coefficients)


@pytest.mark.parametrize("name", NAMES)
def test_equal_sizes_reproduce_the_unweighted_mean(name):
    # Prepare
    fed = Federation(name, sizes=(7, 7, 7, 7))
    uniform = Federation(name, sizes=(1, 10, 100, 1000), weighting="uniform")

    # Execute
    messages, _ = fed.run_round()
    uniform.run_round()

    # Assert: samples with equal sizes == uniform with any sizes == the official mean(0): of
    # the head for every method, of the clients' effective weights for exact methods, and
    # the method's own aggregate with weights exactly 1/K
    assert max_error(fed.state, uniform.state) <= 1e-15
    updates = [fed.clients[m.metadata.dst_node_id].update for m in messages]
    for key in HEAD_KEYS:
        assert (fed.state[key] - torch.stack([u[key] for u in updates]).mean(0)).abs().max() <= 1e-15
    twin = Federation(name, sizes=(7, 7, 7, 7)).strategy
    twin.server_round = 1
    official = twin.aggregate(fed.initial, [dict(u) for u in updates], [1 / CLIENTS] * CLIENTS)
    assert max_error(fed.state, official) <= 1e-15
    if STRATEGIES[name].exact:
        clients = [fed.clients[m.metadata.dst_node_id].effective_weights(fed.W0) for m in messages]
        mean = {layer: torch.stack([c[layer] for c in clients]).mean(0) for layer in LAYERS}
        assert max_error(fed.global_effective_weights(), mean) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_uniform_weighting_ignores_sizes_and_samples_does_not(name):
    # Prepare
    small, large = (1, 10, 100, 1000), (500, 5, 50, 2)

    # Execute
    uniform_a = Federation(name, sizes=small, weighting="uniform")
    uniform_b = Federation(name, sizes=large, weighting="uniform")
    samples = Federation(name, sizes=small)
    for fed in (uniform_a, uniform_b, samples):
        fed.run_round()

    # Assert
    assert states_equal(uniform_a.state, uniform_b.state)
    assert max_error(samples.state, uniform_a.state) > 1e-3


# --------------------------------------------------------------------------------------------
# Participation patterns


@pytest.mark.parametrize("pattern", ["bernoulli", "markov", "cyclic"])
def test_participation_models_choose_the_clients_of_each_round(pattern):
    # Prepare: the model the strategy must use, built independently
    settings = {"name": pattern, "mean_p": 0.4, "a": 0.3, "length": 4}
    fed = Federation("ffa", participation=settings)
    probabilities = participation_probabilities([HISTOGRAMS[p] for p in range(CLIENTS)], 0,
                                                alpha_part=0.1, mean_p=0.4, p_min=0.02)
    model = {"bernoulli": lambda: Bernoulli(probabilities, 1),
             "markov": lambda: Markov(probabilities, 1, a=0.3),
             "cyclic": lambda: Cyclic(probabilities, 1, cycle_length=4)}[pattern]()
    expected = model.matrix(12)

    # Execute
    rows = [sampled_partitions(fed.run_round()[0]) for _ in range(12)]

    # Assert
    assert [np.flatnonzero(row).tolist() for row in expected] == rows
    assert (fed.strategy.participation_matrix() == expected).all()


def test_uniform_participation_samples_exactly_clients_per_round():
    # Prepare
    fed = Federation("fedavg", clients_per_round=3)

    # Execute
    rows = [sampled_partitions(fed.run_round()[0]) for _ in range(8)]

    # Assert
    assert all(len(row) == len(set(row)) == 3 for row in rows)
    assert len({tuple(row) for row in rows}) > 1
    assert fed.strategy.participation_matrix().sum(axis=1).tolist() == [3] * 8


@pytest.mark.parametrize("name", NAMES)
def test_rounds_without_participants_leave_the_state_and_advance_fedau(name):
    # Prepare: Bernoulli with tiny probabilities: most rounds have nobody
    fed = Federation(name, weighting="fedau",
                     participation={"name": "bernoulli", "mean_p": 0.02, "p_min": 0.02})
    empty_rounds = 0
    for _ in range(10):
        before = fed.state

        # Execute
        messages = fed.configure()
        arrays, metrics = fed.aggregate(fed.train(messages))

        # Assert
        if not messages:
            empty_rounds += 1
            assert (arrays, metrics) == (None, None)
            assert states_equal(fed.state, before)
        fed.reference_coefficients(sampled_partitions(messages))
    assert empty_rounds >= 5
    assert fed.strategy.fedau.rounds_seen == 10
    assert fed.strategy.fedau.state_dict() == fed.reference_fedau.state_dict()


def test_participation_needs_every_partitions_label_histogram():
    # Prepare
    fed = Federation("fedavg", participation="markov")

    # Execute / Assert
    with pytest.raises(ValueError, match="participation=markov needs the label histogram of each"):
        fed.strategy.register_nodes({100: 0}, {0: [1, 2, 3]})


# --------------------------------------------------------------------------------------------
# Parts trained per round: a method may alternate them (e.g. B rounds and A rounds)


class AlternatingFedIT(FedIT):
    """FedIT's clients and aggregation, training B (and the head) in odd rounds, A in even ones."""

    def trained_parts_in(self, server_round):
        return ("B", "head") if server_round % 2 else ("A", "head")

    def payload_down(self, node_id, state):
        """The trained parts (the default) and the frozen factor the client trains against."""
        payload = super().payload_down(node_id, state)
        return {**payload, **{k: v for k, v in state.items() if self.part(k) in {"A", "B"}}}


def test_trained_parts_in_decides_what_is_sent_trained_and_accepted():
    # Prepare: a FedIT federation whose strategy alternates the trained factor
    fed = Federation("fedavg")
    fed.strategy = AlternatingFedIT.from_config(fed.cfg, HEAD_KEYS)
    fed.strategy.register_nodes({node: c.partition_id for node, c in fed.clients.items()})
    start = fed.state

    # Execute: round 1 (B), then round 2 (A) with one client replying with both factors
    messages_1, _ = fed.run_round()
    after_1 = fed.state
    messages_2 = fed.configure()
    replies_2 = fed.train(messages_2)
    odd = messages_2[0]
    both = {**fed.clients[odd.metadata.dst_node_id].update,
            **{k: v for k, v in after_1.items() if part_of(k, HEAD_KEYS) == "B"}}
    report = fed.strategy.aggregate_train(2, [reply(odd, both, 10)] + replies_2[1:])

    # Assert: each round asks for and accepts only its own parts; the default payload is them
    default_payload = FederatedLoRA.payload_down(fed.strategy, odd.metadata.dst_node_id, after_1)
    assert {part_of(k, HEAD_KEYS) for k in default_payload} == {"A", "head"}
    for messages, parts in ((messages_1, {"B", "head"}), (messages_2, {"A", "head"})):
        assert all(set(m.content["config"]["trained-parts"].split(",")) == parts for m in messages)
        assert all({part_of(k, HEAD_KEYS) for k in m.content["arrays"]} == {"A", "B", "head"}
                   for m in messages)
    for layer in LAYERS:
        A, B = factor_key(layer, "A"), factor_key(layer, "B")
        assert torch.equal(after_1[A], start[A]) and not torch.equal(after_1[B], start[B])
        new = report.arrays.to_torch_state_dict()
        assert torch.equal(new[B], after_1[B]) and not torch.equal(new[A], after_1[A])
    assert report.clients_trained == CLIENTS - 1
    assert [node for node, _ in report.rejected] == [odd.metadata.dst_node_id]
    assert report.rejected[0][1].startswith("keys differ from the expected tensors (extra")
