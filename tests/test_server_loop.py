"""The server's round loop (``fedlora.run.server.run_server``) on a fake grid and a tiny model.

No Ray and no pretrained model: a 5-dimensional bag-of-words classifier with two adapted 6 x 5
layers, fake clients (``tests.federation.FakeClient``) answering the grid's messages. Checks
the wiring the strategy tests cannot see: rounds in which nobody takes part, the participation
matrix written to ``participation.csv``, and FedEx's base-weight delta in the server's model.
"""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from torch import nn

import fedlora.run.server
from fedlora.model.adapters import inject_lora
from fedlora.config import RunConfig
from fedlora.tasks.classification import TextDataset, TextSplit
from fedlora.model.pretrained import AdaptedModel
from fedlora.aggregation.participation import Bernoulli, participation_probabilities
from fedlora.run.server import run_server
from tests.federation import ALPHA, HISTOGRAMS, M, N, NUM_LABELS, RANK, SIZES, FakeClient

pytestmark = pytest.mark.usefixtures("flower_task")

TEXTS = ("a bb ccc", "dddd e", "ff ggg hhhh", "i jj", "kkkkk ll m", "nn ooo")
LABELS = (0, 1, 2, 0, 1, 2)


class WordTokenizer:
    """One token id per word (its length), pad id 0."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[len(word) for word in text.split()][:max_length] for text in texts]}


class TinyClassifier(nn.Module):
    """Mean word embedding -> query(x) + value(x) -> tanh -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, N)
        self.query, self.value = nn.Linear(N, M), nn.Linear(N, M)
        self.head = nn.Linear(M, NUM_LABELS)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).float()
        hidden = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.head(torch.tanh(self.query(hidden) + self.value(hidden))))


class FakeGrid:
    """Answers ``query.describe`` with each client's partition and ``train`` with its update."""

    def __init__(self, clients: dict[int, FakeClient]):
        self.clients = clients
        self.sent = 0

    def get_node_ids(self):
        return list(self.clients)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            client = self.clients[message.metadata.dst_node_id]
            if message.metadata.message_type == "query.describe":
                replies.append(Message(RecordDict({"metrics": MetricRecord({
                    "partition-id": client.partition_id, "num-examples": client.num_examples,
                    "label-histogram": HISTOGRAMS[client.partition_id]})}), reply_to=message))
            else:
                self.sent += 1
                replies.append(client.train(message, seed=self.sent, step=0.05))
        return replies


@pytest.fixture
def tiny_bundle():
    return make_tiny_bundle()


def make_tiny_bundle(latent: bool = False) -> AdaptedModel:
    """A fresh model, as a new server process builds it (``latent``: LoRA-SB's B R A)."""
    torch.manual_seed(0)
    model = TinyClassifier()
    adapted = inject_lora(model, ("query", "value"), RANK, ALPHA, latent=latent)
    return AdaptedModel.from_adapted(model, WordTokenizer(), adapted, frozenset({"head.weight", "head.bias"}))


def test_fedex_with_fedau_and_bernoulli_participation_runs_through_empty_rounds(tiny_bundle, tmp_path,
                                                                                monkeypatch):
    # Prepare: low participation probabilities, so some rounds have no client
    cfg = RunConfig.from_dict({"strategy": "fedex", "clients": 4, "rounds": 8, "rank": RANK,
                               "alpha": ALPHA, "max_length": 8, "weighting": "fedau",
                               "participation": {"name": "bernoulli", "mean_p": 0.15}})
    data = TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("x", "y", "z"))
    clients = {100 + p: FakeClient(p, SIZES[p], tiny_bundle.initial_state) for p in range(4)}
    created = []
    original = fedlora.run.server.get_strategy

    def recording_get_strategy(name):
        cls = original(name)
        return SimpleNamespace(from_config=lambda *args: created.append(cls.from_config(*args))
                               or created[-1])

    monkeypatch.setattr(fedlora.run.server, "get_strategy", recording_get_strategy)

    # Execute
    summary = run_server(FakeGrid(clients), cfg, tmp_path, tiny_bundle, data)

    # Assert: one row per round, 0 clients in the empty ones, the matrix of the seeded model
    strategy = created[0]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    with (tmp_path / "participation.csv").open() as f:
        table = list(csv.reader(f))
    matrix = np.array([[int(v) for v in row[1:]] for row in table[1:]], dtype=bool)
    probabilities = participation_probabilities([HISTOGRAMS[p] for p in range(4)], cfg.seed,
                                                alpha_part=0.1, mean_p=0.15, p_min=0.02)
    assert table[0] == ["round", "c0", "c1", "c2", "c3"]
    assert (matrix == Bernoulli(probabilities, cfg.seed + 1).matrix(8)).all()
    assert [r["round"] for r in rows] == list(range(9))
    assert [r["clients_trained"] for r in rows[1:]] == matrix.sum(axis=1).tolist()
    assert 0 in matrix.sum(axis=1) and matrix.sum() >= 3
    assert all(r["clients_failed"] == 0 for r in rows)
    assert strategy.fedau.rounds_seen == 8
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    # The server evaluated with W0 + the global FedEx delta in its base weights.
    delta = strategy.global_base_delta()
    assert delta is not None and set(delta) == set(tiny_bundle.adapted)
    for layer in tiny_bundle.adapted:
        weight = tiny_bundle.model.get_submodule(layer).base.weight
        expected = tiny_bundle.pretrained_base[layer] + delta[layer].to(weight.dtype)
        assert torch.equal(weight, expected)
        assert not torch.equal(weight, tiny_bundle.pretrained_base[layer])


def test_nodes_must_hold_each_partition_once(tiny_bundle, tmp_path):
    # Prepare: two SuperNodes started with the same partition-id, none with 2
    cfg = RunConfig.from_dict({"strategy": "fedavg", "clients": 4, "rounds": 1, "rank": RANK,
                               "alpha": ALPHA, "max_length": 8})
    data = TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("x", "y", "z"))
    clients = {100 + i: FakeClient(p, SIZES[p], tiny_bundle.initial_state)
               for i, p in enumerate((0, 1, 1, 3))}
    # Execute / Assert: stopped before any training, naming the fix
    with pytest.raises(RuntimeError, match=r"the 4 nodes hold partitions \[0, 1, 1, 3\]; clients=4 "
                                           r"needs each of 0..3 once: start node i with --node-config "
                                           r"'partition-id=i num-partitions=4'"):
        run_server(FakeGrid(clients), cfg, tmp_path, tiny_bundle, data)
    assert not (tmp_path / "results.jsonl").read_text()


def test_clients_of_different_ranks_and_the_score_of_each_rank_tier(tiny_bundle, tmp_path):
    # Prepare: FlexLoRA with partitions at ranks 1, 2, 1, 2 (the global has rank 2)
    cfg = RunConfig.from_dict({"strategy": "flexlora", "clients": 4, "rounds": 2,
                               "client_ranks": [1, 2], "alpha": ALPHA, "max_length": 8})
    data = TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("x", "y", "z"))
    clients = {100 + p: FakeClient(p, SIZES[p], tiny_bundle.initial_state) for p in range(4)}

    # Execute
    run_server(FakeGrid(clients), cfg, tmp_path, tiny_bundle, data)

    # Assert: each partition's rank on file; every row scores the global model and each tier's
    # download (the rank-1 tier differs from the global once trained), and the truncation error
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert [p["rank"] for p in partitions] == [1, 2, 1, 2]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(set(row["tiers"]) == {"1", "2"} for row in rows)
    assert all(row["tiers"]["2"] == {k: row[k] for k in ("accuracy", "loss")} for row in rows)
    assert rows[-1]["tiers"]["1"]["loss"] != rows[-1]["loss"]
    assert set(rows[-1]["truncation_error"]) == {"1", "2"} and rows[-1]["truncation_error"]["1"] > 0
    assert [param.shape[0] for name, param in tiny_bundle.model.named_parameters()
            if name.endswith("lora_A.weight")] == [2, 2]  # the server's model is back at rank 2
