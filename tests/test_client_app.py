"""The ClientApp's state handling: what a client loads before training, and FedEx's base.

The pure helpers run on tiny tensors; the ``train`` handler runs once per strategy on the real
embedded model (built once for the module, as a Ray worker builds it once), one local step.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.model import pretrained as models
from fedlora.model.adapters import part_of
from fedlora.clients.app import describe, full_adapter_state, setup, train
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig, client_config
from fedlora.config import PartitionConfig
from fedlora.tasks.data import DataSpec, client_partitions
from fedlora.tasks import make_task
from fedlora.strategies import get_strategy
from fedlora.strategies.fedex import residual_increments, update_base_delta

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_full_state_prefers_sent_over_kept_over_seeded():
    # Prepare
    seeded = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}
    kept = {"b": torch.ones(2), "c": torch.ones(2)}
    received = {"c": torch.full((2,), 2.0)}

    # Execute
    state = full_adapter_state(received, kept, seeded, ["a", "b", "c"])

    # Assert
    assert [state[k][0].item() for k in "abc"] == [0.0, 1.0, 2.0]


def test_full_state_refuses_to_train_on_leftovers():
    # Execute / Assert
    with pytest.raises(RuntimeError, match=r"the node has no value for \['x'\]"):
        full_adapter_state({"a": torch.zeros(1)}, {}, {}, ["a", "x"])


def test_residual_increments_dense_and_factored():
    # Prepare
    B, A = torch.randn(6, 4, dtype=F64), torch.randn(4, 5, dtype=F64)

    # Execute
    increments = residual_increments({"q.base.residual": B @ A, "v.base.residual_B": B,
                                      "v.base.residual_A": A})

    # Assert
    assert torch.equal(increments["q"], B @ A) and torch.equal(increments["v"], B @ A)


def test_base_delta_adds_new_rounds_skips_known_ones_and_restarts_from_round_zero():
    # Prepare
    one, two = {"q.base.residual": torch.ones(2, 2)}, {"q.base.residual": torch.full((2, 2), 2.0)}

    # Execute
    delta, held = update_base_delta({}, 0, 0, 1, one)
    added, added_held = update_base_delta(delta, held, 1, 3, two)
    same, same_held = update_base_delta(added, added_held, 1, 3, two)  # a resent message
    fresh, fresh_held = update_base_delta(added, added_held, 0, 4, one)  # a full resend

    # Assert
    assert (held, added_held, same_held, fresh_held) == (1, 3, 3, 4)
    assert added["q"][0, 0] == 3.0 and same["q"][0, 0] == 3.0 and fresh["q"][0, 0] == 1.0
    with pytest.raises(RuntimeError, match="holds the residuals of 3 rounds but the server sent rounds 2..4"):
        update_base_delta(added, added_held, 2, 4, one)


# --------------------------------------------------------------------------------------------
# The train handler on the real model


@pytest.fixture(scope="module")
def client_model():
    cfg = RunConfig.from_dict({"strategy": "fedex", "clients": 4, "rank": 2, "seed": 0})
    return models.cached_model(cfg.model_spec(21))  # the very model the clients will use


def federation(strategy: str, bundle, **overrides):
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 4, "clients_per_round": 2,
                               "rank": 2, "seed": 0, "local_steps": 1, "batch_size": 4,
                               "max_length": 16, **overrides})
    server = get_strategy(strategy).from_config(cfg, bundle.head_keys)
    server.register_nodes({10 + p: p for p in range(4)})
    contexts = {10 + p: Context(run_id=1, node_id=10 + p, state=RecordDict(), run_config={},
                                node_config={"partition-id": p, "num-partitions": 4})
                for p in range(4)}
    return cfg, server, contexts


def run_round(server, contexts, cfg, arrays, server_round):
    messages = server.configure_train(server_round, arrays, ConfigRecord(client_config(cfg, 21)), None)
    replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
    new_arrays, _ = server.aggregate_train(server_round, replies)
    return messages, replies, new_arrays


@pytest.mark.usefixtures("flower_task")
def test_ffa_client_trains_B_from_the_seeded_A(client_model):
    # Prepare
    bundle = client_model
    cfg, server, contexts = federation("ffa", bundle)
    arrays = ArrayRecord(bundle.initial_state)
    bundle.load({k: torch.zeros_like(v) for k, v in bundle.state(("A",)).items()})  # leftovers

    # Execute
    messages, replies, _ = run_round(server, contexts, cfg, arrays, 1)

    # Assert: A never travels, the client trained from the seeded A and returned B and the head
    for message, answer in zip(messages, replies):
        assert not answer.has_error(), answer.error
        assert "A" not in {part_of(k, bundle.head_keys) for k in message.content["arrays"]}
        assert {part_of(k, bundle.head_keys) for k in answer.content["arrays"]} == {"B", "head"}
    for key, value in bundle.state(("A",)).items():
        assert torch.equal(value, bundle.initial_state[key])


@pytest.mark.usefixtures("flower_task")
def test_fedex_client_trains_on_its_own_base_on_a_shared_model(client_model):
    # Prepare
    bundle = client_model
    cfg, server, contexts = federation("fedex", bundle)
    arrays = ArrayRecord(bundle.initial_state)
    layer = bundle.adapted[0]
    weight = bundle.model.get_submodule(layer).base.weight

    # Execute: two rounds; round 2's clients receive round 1's residual
    _, _, arrays = run_round(server, contexts, cfg, arrays, 1)
    messages, replies, arrays = run_round(server, contexts, cfg, arrays, 2)
    last = messages[-1].metadata.dst_node_id
    trained_base = weight.detach().clone()
    ffa_cfg, ffa, ffa_contexts = federation("ffa", bundle)
    run_round(ffa, ffa_contexts, ffa_cfg, ArrayRecord(bundle.initial_state), 1)

    # Assert: the last FedEx client trained on W0 + its delta (which its Context keeps);
    # the next method's client on the same model got W0 back, bit for bit
    assert all(not r.has_error() for r in replies)
    delta = contexts[last].state["base-delta"].to_torch_state_dict()
    assert set(delta) == set(bundle.adapted)
    round_one = server.residuals[0][layer]
    expected = round_one[0].double() @ round_one[1].double()
    assert (delta[layer].double() - expected).abs().max() <= 1e-6
    assert torch.equal(trained_base, bundle.pretrained_base[layer] + delta[layer])
    assert torch.equal(weight, bundle.pretrained_base[layer])


@pytest.mark.usefixtures("flower_task")
def test_fedex_nodes_restarted_with_empty_state_train_exactly_as_before(client_model):
    # Prepare: two rounds, then a server restart: its state saved and loaded into a new
    # strategy, the nodes back under new ids with an empty Context.state
    bundle = client_model
    cfg, server, contexts = federation("fedex", bundle, clients_per_round=4)
    arrays = ArrayRecord(bundle.initial_state)
    for server_round in (1, 2):
        _, _, arrays = run_round(server, contexts, cfg, arrays, server_round)
    _, restarted, fresh_contexts = federation("fedex", bundle, clients_per_round=4)
    restarted.load_state_dict(server.state_dict())
    renamed = {50 + p: p for p in range(4)}
    restarted.nodes_restarted(renamed)
    fresh_contexts = {50 + p: c for p, c in enumerate(fresh_contexts.values())}

    # Execute: round 3 on the nodes that kept their state, and on the restarted ones
    messages, replies, kept_arrays = run_round(server, contexts, cfg, arrays, 3)
    restored_messages, restored_replies, restored_arrays = run_round(
        restarted, fresh_contexts, cfg, arrays, 3)

    # Assert: the same updates and global state, bit for bit; only the restore record differs
    for reply, restored in zip(replies, restored_replies):
        assert not restored.has_error(), restored.error
        sent, got = reply.content["arrays"].to_torch_state_dict(), restored.content["arrays"].to_torch_state_dict()
        assert all(torch.equal(sent[k], got[k]) for k in sent)
    kept, restored_state = kept_arrays.to_torch_state_dict(), restored_arrays.to_torch_state_dict()
    assert all(torch.equal(kept[k], restored_state[k]) for k in kept)
    assert all("restore" in m.content.array_records for m in restored_messages)
    assert not any("restore" in m.content.array_records for m in messages)
    for p in range(4):
        before = contexts[10 + p].state["base-delta"].to_torch_state_dict()
        after = fresh_contexts[50 + p].state["base-delta"].to_torch_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not restarted.restoring  # every node is whole again


@pytest.mark.usefixtures("flower_task")
def test_seeded_crash_is_an_error_reply(client_model):
    # Prepare: crash_prob close to 1, so every client fails
    bundle = client_model
    cfg, server, contexts = federation("fedavg", bundle, faults={"crash_prob": 0.999})

    # Execute
    messages = server.configure_train(1, ArrayRecord(bundle.initial_state),
                                      ConfigRecord(client_config(cfg, 21)), None)
    replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
    report = server.aggregate_train(1, replies)

    # Assert
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    assert "simulated crash of partition" in replies[0].error.reason
    assert report.arrays is None and len(report.rejected) == 2


@pytest.mark.usefixtures("flower_task")
def test_a_supernode_reads_its_own_copy_of_the_data_from_node_config(client_model, tmp_path):
    """Deployment: ``--node-config 'data.path="..." partition-id=1 num-partitions=2'`` makes
    the node take partition 1 of its local file, whatever path the server's config names."""
    # Prepare: a node-local file with 2 of the 21 labels; the server's config names the corpus
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": f"local sentence {i}", "label": "xy"[i % 2]}) + "\n"
                            for i in range(60)))
    cfg = RunConfig.from_dict({"strategy": "fedex", "clients": 2, "rank": 2, "seed": 0})
    message = Message(content=RecordDict({"config": ConfigRecord(client_config(cfg, 21))}),
                      dst_node_id=10, message_type="query.describe")
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config={},
                      node_config={"partition-id": 1, "num-partitions": 2, "data.path": str(path)})
    # Execute
    metrics = describe(message, context).content["metrics"]
    # Assert
    local = DataSpec(path=str(path))
    expected = client_partitions(make_task("classification", local), 2, PartitionConfig(), 0)[1]
    assert metrics["num-examples"] == len(expected) > 0
    histogram = list(metrics["label-histogram"])
    assert len(histogram) == 21 and sum(histogram) == len(expected)
    assert sum(histogram[:2]) == len(expected)  # only the local file's 2 labels


def setup_message(strategy: str, bundle, **config) -> tuple[Message, Context]:
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 4, "rank": 2, "seed": 0,
                               "max_length": 16, "batch_size": 4})
    head = {k: v for k, v in bundle.initial_state.items() if part_of(k, bundle.head_keys) == "head"}
    message = Message(content=RecordDict({"arrays": ArrayRecord(head), "config": ConfigRecord(
                          {**client_config(cfg, 21), "server-round": 0, **config})}),
                      dst_node_id=10, message_type=SETUP_MESSAGE_TYPE)
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config={},
                      node_config={"partition-id": 1, "num-partitions": 4})
    return message, context


@pytest.mark.usefixtures("flower_task")
def test_fedsb_setup_replies_the_base_weight_gradients_of_its_share(client_model):
    # Prepare
    message, context = setup_message("fedsb", client_model, **{"init-samples": 3})

    # Execute
    answer = setup(message, context)

    # Assert: one m x n gradient per adapted base weight, over exactly its 3 examples
    arrays = answer.content["arrays"].to_torch_state_dict()
    assert sorted(arrays) == sorted(f"{name}.base.weight" for name in client_model.adapted)
    for name in client_model.adapted:
        base = client_model.model.get_submodule(name).base.weight
        assert arrays[f"{name}.base.weight"].shape == base.shape
        assert arrays[f"{name}.base.weight"].abs().sum() > 0
    assert answer.content["metrics"]["num-examples"] == 3


@pytest.mark.usefixtures("flower_task")
def test_a_setup_message_to_a_method_without_a_setup_step_is_a_clear_error(client_model):
    # Prepare
    message, context = setup_message("fedavg", client_model)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="strategy 'fedavg' has no set-up step, but the node "
                                           "got a 'train.setup' message"):
        setup(message, context)


@pytest.mark.usefixtures("flower_task")
def test_head_lr_reaches_the_client_and_scales_only_the_heads_step(client_model):
    # Prepare: one plain-SGD round twice from the same state, the head at lr and at 10 * lr
    bundle = client_model
    runs = {}
    for head_lr in (None, 5.0):
        cfg, server, contexts = federation("fedavg", bundle, optimizer="sgd", lr=0.5,
                                           head_lr=head_lr, rounds=3)
        arrays = ArrayRecord(bundle.initial_state)

        # Execute
        messages, replies, _ = run_round(server, contexts, cfg, arrays, 1)
        runs[head_lr] = (messages, replies)

    # Assert: round 1 of a cosine schedule sends both rates undecayed; the adapters take the
    # same step, the head a step exactly 10 times as long
    for message in runs[5.0][0]:
        assert (message.content["config"]["lr"], message.content["config"]["head-lr"]) == (0.5, 5.0)
    assert all(m.content["config"]["head-lr"] == 0.5 for m in runs[None][0])
    for plain, scaled in zip(runs[None][1], runs[5.0][1]):
        plain_state = plain.content["arrays"].to_torch_state_dict()
        scaled_state = scaled.content["arrays"].to_torch_state_dict()
        for key, value in plain_state.items():
            start = bundle.initial_state[key]
            if key in bundle.head_keys:
                torch.testing.assert_close(scaled_state[key] - start, 10 * (value - start),
                                           rtol=1e-4, atol=1e-6)
                assert not torch.equal(value, start)
            else:
                torch.testing.assert_close(scaled_state[key], value, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("flower_task")
def test_a_client_trains_at_its_own_rank_on_the_shared_model(client_model):
    # Prepare: FFA-LoRA with partitions at ranks 1 and 2 (the model is built at 2)
    bundle = client_model
    cfg, server, contexts = federation("ffa", bundle, client_ranks=[1, 2], clients_per_round=4)
    arrays = ArrayRecord(bundle.initial_state)
    try:
        # Execute
        messages, replies, new_arrays = run_round(server, contexts, cfg, arrays, 1)
        rank_one = [m for m in messages if m.content["config"]["client-rank"] == 1]
        served_at_one = bundle.state(("A",))  # the last client is partition 3, rank 2
    finally:
        bundle.set_rank(2)
        bundle.load(bundle.initial_state)

    # Assert: each reply's B has the client's rank; its A was the seed's first rows (the
    # shared model, resized per message, trains with the seed's A sliced)
    assert len(rank_one) == 2 and new_arrays is not None
    for message, answer in zip(messages, replies):
        rank = message.content["config"]["client-rank"]
        assert not answer.has_error(), answer.error
        for key, value in answer.content["arrays"].to_torch_state_dict().items():
            if part_of(key, bundle.head_keys) == "B":
                assert value.shape[1] == rank
    assert all(value.shape[0] == 2 for value in served_at_one.values())
    for key, value in new_arrays.to_torch_state_dict().items():
        assert value.shape == bundle.initial_state[key].shape  # the global keeps rank 2


@pytest.mark.usefixtures("flower_task")
def test_hetlora_client_prunes_when_its_tail_shrinks(client_model):
    # Prepare: a strong pruning term; round 2 starts from a global with a non-zero tail
    bundle = client_model
    cfg, server, contexts = federation("hetlora", bundle, client_ranks=[2],
                                       hetlora={"prune_lambda": 1e4}, local_steps=3)
    arrays = ArrayRecord(bundle.initial_state)
    weak_cfg, weak, weak_contexts = federation("hetlora", bundle, client_ranks=[2],
                                               hetlora={"prune_lambda": 0.0}, local_steps=3)

    # Execute
    _, _, arrays = run_round(server, contexts, cfg, arrays, 1)
    messages, replies, _ = run_round(server, contexts, cfg, arrays, 2)
    _, weak_replies, _ = run_round(weak, weak_contexts, weak_cfg, arrays, 2)

    # Assert: with the term the tail shrank and the clients train at floor(0.99 * 2) = 1 from
    # now on; without it the tail grows and nobody prunes
    assert all(m.content["config"]["prune-decay"] == 0.99 for m in messages)
    assert [r.content["metrics"].get("next-rank") for r in replies] == [1, 1]
    assert [server.client_rank(m.metadata.dst_node_id - 10) for m in messages] == [1, 1]
    assert all("next-rank" not in r.content["metrics"] for r in weak_replies)
