"""Hosted clients (docs/design/client-batching.md), without Ray.

``run_server`` drives in-process grids whose nodes answer with the ClientApp's own handlers
(``tests.test_generation_federation.ClientAppGrid``): one node per client (today's engine), or
``HostedGrid`` over a few host nodes that serve their clients one after another. The oracle is
the one-node-per-client engine itself.

Model: a tiny random BERT (2 layers, hidden and attention dropout 0.1, SDPA) with MiniLM's
tokenizer for the classification task, saved as a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

import fedlora.model.pretrained as models
from fedlora.clients.host import (HOSTED, HostedClient, client_context, keep_client_state, pack,
                                  unpack)
from fedlora.config import RunConfig, check_deployment, resolve_noise
from fedlora.core.errors import ConfigError
from fedlora.run.hosted import HostedGrid, virtual_node_id
from fedlora.run.server import prepare, run_server
from fedlora.strategies import STRATEGIES
from tests.test_generation_federation import ClientAppGrid

pytestmark = pytest.mark.usefixtures("flower_task")


# --------------------------------------------------------------------------------------------
# Packing and contexts


def test_pack_and_unpack_name_each_record_by_partition():
    # Prepare
    first = RecordDict({"arrays": ArrayRecord({"a": torch.ones(2)}), "config": ConfigRecord({"x": 1})})
    second = RecordDict({"config": ConfigRecord({"x": 2})})

    # Execute
    packed = pack({3: first, 12: second})
    packed[HOSTED] = ConfigRecord({"partition-ids": [3, 12]})
    contents = unpack(packed)

    # Assert
    assert sorted(packed.keys()) == ["12/config", "3/arrays", "3/config", HOSTED]
    assert sorted(contents) == [3, 12]
    assert contents[3]["config"]["x"] == 1 and contents[12]["config"]["x"] == 2
    assert torch.equal(contents[3]["arrays"].to_torch_state_dict()["a"], torch.ones(2))


def test_a_hosted_clients_state_lives_under_its_prefix_of_the_hosts_state():
    # Prepare: the host holds client 4's record and client 14's (whose name starts alike)
    host = Context(run_id=1, node_id=7, state=RecordDict({
        "clients/4/kept": ArrayRecord({"a": torch.zeros(1)}),
        "clients/14/kept": ArrayRecord({"a": torch.ones(1)})}), run_config={},
        node_config={"partition-id": 0, "num-partitions": 2, "data.path": "x"})

    # Execute: client 4 sees only its record, changes it and adds one
    context = client_context(host, 4, 20)
    seen = sorted(context.state.keys())
    context.state["kept"] = ArrayRecord({"a": torch.full((1,), 2.0)})
    context.state["mark"] = ConfigRecord({"round": 3})
    keep_client_state(host, HostedClient(4, None, context))

    # Assert
    assert seen == ["kept"]
    assert context.node_config == {"partition-id": 4, "num-partitions": 20, "data.path": "x"}
    assert sorted(host.state.keys()) == ["clients/14/kept", "clients/4/kept", "clients/4/mark"]
    assert host.state["clients/4/kept"].to_torch_state_dict()["a"].item() == 2.0
    assert host.state["clients/14/kept"].to_torch_state_dict()["a"].item() == 1.0


# --------------------------------------------------------------------------------------------
# HostedGrid against a fake grid of host nodes


class EchoHosts:
    """Host nodes 11, 12, 13 that answer each packed message from its records: partition p's
    reply carries p, except partition 5 (an error), and host 12 fails as a whole."""

    def __init__(self):
        self.received: list[Message] = []

    def get_node_ids(self):
        return [13, 11, 12]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.received.append(message)
            if message.metadata.dst_node_id == 12:
                replies.append(Message(Error(code=4, reason="host crashed"), reply_to=message))
                continue
            contents = {}
            for pid in message.content[HOSTED]["partition-ids"]:
                if pid == 5:
                    contents[pid] = RecordDict({"error": ConfigRecord({"code": 2, "reason": "bad data"})})
                else:
                    contents[pid] = RecordDict({"metrics": MetricRecord({"pid": pid})})
            replies.append(Message(pack(contents), reply_to=message))
        return replies


def test_hosted_grid_packs_by_host_and_gives_each_client_its_own_reply():
    # Prepare: 9 clients on 3 hosts (p mod 3), 6 of them sampled
    hosts = EchoHosts()
    grid = HostedGrid(hosts, clients=9, hosts=3, client_batch=2)
    sampled = [0, 1, 3, 4, 5, 6]
    messages = [Message(RecordDict({"config": ConfigRecord({"p": p})}), dst_node_id=virtual_node_id(p),
                        message_type="train") for p in sampled]

    # Execute
    nodes = grid.get_node_ids()
    replies = grid.send_and_receive(messages, timeout=1)

    # Assert: one virtual node per client; host i (the i-th smallest id) carries p = i mod 3
    assert nodes == [virtual_node_id(p) for p in range(9)]
    packed = {m.metadata.dst_node_id: list(m.content[HOSTED]["partition-ids"]) for m in hosts.received}
    assert packed == {11: [0, 3, 6], 12: [1, 4], 13: [5]}
    assert all(m.content[HOSTED]["client-batch"] == 2 and m.content[HOSTED]["num-partitions"] == 9
               for m in hosts.received)
    by_partition = {r.metadata.src_node_id - virtual_node_id(0): r for r in replies}
    assert sorted(by_partition) == sampled
    assert by_partition[5].has_error() and by_partition[5].error.reason == "bad data"
    for p in (0, 3, 6):
        assert by_partition[p].content["metrics"]["pid"] == p
    for p in (1, 4):  # the host's failure is each of its clients'
        assert by_partition[p].has_error() and "its host node failed: host crashed" in by_partition[p].error.reason
    original = {m.metadata.dst_node_id: m.metadata.message_id for m in messages}
    assert all(r.metadata.reply_to_message_id == original[r.metadata.src_node_id] for r in replies)


def test_a_clients_error_in_a_hosts_reply_is_that_clients_alone():
    # Prepare
    hosts = EchoHosts()
    grid = HostedGrid(hosts, clients=9, hosts=3)
    messages = [Message(RecordDict(), dst_node_id=virtual_node_id(p), message_type="train") for p in (2, 5, 8)]

    # Execute
    replies = {r.metadata.src_node_id - virtual_node_id(0): r for r in grid.send_and_receive(messages)}

    # Assert
    assert replies[5].has_error() and replies[5].error.reason == "bad data" and replies[5].error.code == 2
    assert not replies[2].has_error() and not replies[8].has_error()


# --------------------------------------------------------------------------------------------
# Configuration


def test_client_batch_resolves_the_hosts_and_refuses_record_level_dp_and_deployment():
    # Execute
    plain = RunConfig.from_dict({"clients": 100, "clients_per_round": 10})
    batched = RunConfig.from_dict({"clients": 100, "clients_per_round": 10, "client_batch": 3})
    hosted = RunConfig.from_dict({"clients": 100, "client_hosts": 7})

    # Assert
    assert (plain.hosts, batched.hosts, hosted.hosts) == (None, 4, 7)
    with pytest.raises(ConfigError, match="client_batch=2 with record-level DP"):
        RunConfig.from_dict({"client_batch": 2, "dp": {"epsilon": 8}})
    with pytest.raises(ConfigError, match="client_hosts=5 exceeds clients=4"):
        RunConfig.from_dict({"clients": 4, "client_hosts": 5})
    with pytest.raises(ConfigError, match="a real SuperNode is one client"):
        check_deployment(batched)
    RunConfig.from_dict({"client_batch": 2, "dp": {"epsilon": 8, "mode": "client"}})  # fine


# --------------------------------------------------------------------------------------------
# The real ClientApp: hosted and batched rounds against one node per client


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT with MiniLM's tokenizer: dropout everywhere, SDPA attention."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    AutoTokenizer.from_pretrained(models.model_path("minilm")).save_pretrained(folder)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def topic_config(strategy: str, bert_folder, **overrides) -> RunConfig:
    """100 clients of ~15 examples and batches of 16: clients' batches differ in rows."""
    return RunConfig.from_dict({"strategy": strategy, "model": str(bert_folder), "clients": 100,
                                "clients_per_round": 6, "rounds": 2, "local_steps": 2,
                                "batch_size": 16, "max_length": 16, "rank": 2, "seed": 0,
                                "fedsb": {"init_samples": 24}, **overrides})


def hosted_grid(cfg: RunConfig, hosts: int, client_batch: int) -> HostedGrid:
    return HostedGrid(ClientAppGrid(hosts), cfg.clients, hosts, client_batch)


def serve(grid, cfg: RunConfig, out: Path) -> dict:
    """``run_server`` on ``grid`` with a server model of its own, as a new process builds it,
    and DP noise as a simulation draws it (reproducible)."""
    cfg = resolve_noise(cfg, deployment=False)
    data, bundle = prepare(cfg)
    return run_server(grid, cfg, out, bundle, data)


def rows_of(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_s")
    return rows


@pytest.mark.parametrize("strategy", ["fedsb", "fedex"])
def test_hosted_clients_one_after_another_give_the_one_node_per_client_run_bit_for_bit(
        strategy, bert_folder, tmp_path):
    # Prepare: Fed-SB keeps B and A per node and has a set-up round; FedEx a base delta; a
    # third of the clients crash in some rounds (their error travels back through the host)
    cfg = topic_config(strategy, bert_folder, rounds=3, faults={"crash_prob": 0.3})

    # Execute: each run with a server model of its own, as a new process builds it
    serve(ClientAppGrid(cfg.clients), cfg, tmp_path / "nodes")
    serve(hosted_grid(cfg, 3, 1), cfg, tmp_path / "hosted")

    # Assert
    nodes, hosted = rows_of(tmp_path / "nodes"), rows_of(tmp_path / "hosted")
    assert hosted == nodes
    assert sum(r["clients_failed"] for r in nodes) > 0
    first = torch.load(tmp_path / "nodes" / "final_adapter.pt")["adapter"]
    second = torch.load(tmp_path / "hosted" / "final_adapter.pt")["adapter"]
    assert all(torch.equal(first[k], second[k]) for k in first)
