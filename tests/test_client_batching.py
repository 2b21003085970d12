"""Hosted clients and batched local training (docs/design/client-batching.md), without Ray.

``run_server`` drives in-process grids whose nodes answer with the ClientApp's own handlers
(``tests.test_generation_federation.ClientAppGrid``): one node per client (today's engine), or
``HostedGrid`` over a few host nodes that serve their clients one after another
(``client_batch=1``) or up to ``client_batch`` in one pass. The oracle of every comparison is
the one-node-per-client engine itself, run on the same messages.

Models: a tiny random BERT (2 layers, hidden and attention dropout 0.1, SDPA) with MiniLM's
tokenizer for the classification task, and the tiny random Llama of the generation tests (with
attention dropout 0.1 here) for the causal-LM task, both saved as local folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

import fedlora.model.pretrained as models
from fedlora.clients.app import balanced_chunks
from fedlora.clients.host import (HOSTED, HostedClient, client_context, keep_client_state, pack,
                                  unpack)
from fedlora.config import RunConfig, check_deployment, resolve_noise
from fedlora.core.errors import ConfigError
from fedlora.run.hosted import HostedGrid, virtual_node_id
from fedlora.run.server import prepare, run_server
from fedlora.strategies import STRATEGIES
from tests.test_generation_federation import ClientAppGrid, sft_data  # noqa: F401 (fixture)
from tests.test_generation_task import char_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("flower_task")


# --------------------------------------------------------------------------------------------
# Packing, contexts, chunks


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


@pytest.mark.parametrize("count, size, expected", [(8, 5, [4, 4]), (5, 5, [5]), (11, 5, [4, 4, 3]),
                                                   (3, 1, [1, 1, 1]), (1, 10, [1])])
def test_a_hosts_clients_split_into_the_fewest_chunks_of_near_equal_size(count, size, expected):
    # Execute
    chunks = balanced_chunks(list(range(count)), size)

    # Assert: sizes as expected, every client once, in order
    assert [len(c) for c in chunks] == expected
    assert [i for c in chunks for i in c] == list(range(count))


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


def test_client_batch_resolves_the_hosts_takes_dp_and_refuses_deployment():
    # Execute
    plain = RunConfig.from_dict({"clients": 100, "clients_per_round": 10})
    batched = RunConfig.from_dict({"clients": 100, "clients_per_round": 10, "client_batch": 3})
    hosted = RunConfig.from_dict({"clients": 100, "client_hosts": 7})
    private = RunConfig.from_dict({"clients": 100, "client_batch": 2, "dp": {"epsilon": 8}})

    # Assert: record-level DP (tests/test_batched_dp.py) and client-level DP are accepted
    assert (plain.hosts, batched.hosts, hosted.hosts) == (None, 4, 7)
    assert private.dp.record_level and private.client_batch == 2
    with pytest.raises(ConfigError, match="client_hosts=5 exceeds clients=4"):
        RunConfig.from_dict({"clients": 4, "client_hosts": 5})
    with pytest.raises(ConfigError, match="a real SuperNode is one client"):
        check_deployment(batched)
    with pytest.raises(ConfigError, match="a real SuperNode is one client"):
        check_deployment(private)
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


@pytest.fixture(scope="module")
def dropout_llama_folder(tmp_path_factory):
    """The generation tests' tiny Llama, with attention dropout 0.1."""
    folder = tmp_path_factory.mktemp("tiny-llama-dropout")
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer)
    model.config.attention_dropout = 0.1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def topic_config(strategy: str, bert_folder, **overrides) -> RunConfig:
    """100 clients of ~15 examples and batches of 16: clients' batches differ in rows (fp32:
    the tolerances below are float32's, not bf16 autocast's)."""
    return RunConfig.from_dict({"strategy": strategy, "model": str(bert_folder), "clients": 100,
                                "clients_per_round": 6, "rounds": 2, "local_steps": 2,
                                "batch_size": 16, "max_length": 16, "rank": 2, "seed": 0, "precision": "fp32",
                                "fedsb": {"init_samples": 24}, **overrides})


def sft_run_config(strategy: str, llama_folder, sft_folder, **overrides) -> RunConfig:
    """4 clients of 1 or 2 examples, batches of 2: unequal rows and lengths."""
    return RunConfig.from_dict({"task": "sft", "strategy": strategy, "model": str(llama_folder),
                                "data": {"path": str(sft_folder)}, "clients": 4,
                                "clients_per_round": 4, "rounds": 2, "local_steps": 2,
                                "batch_size": 2, "rank": 2, "max_length": 48, "seed": 0, "precision": "fp32",
                                "eval": {"max_examples": 2, "max_new_tokens": 3},
                                "fedsb": {"init_samples": 4}, **overrides})


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
    for a, b in zip(hosted, nodes):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert len(hosted) == len(nodes)
    assert sum(r["clients_failed"] for r in nodes) > 0
    first = torch.load(tmp_path / "nodes" / "final_adapter.pt")["adapter"]
    second = torch.load(tmp_path / "hosted" / "final_adapter.pt")["adapter"]
    assert all(torch.equal(first[k], second[k]) for k in first)


class TwinGrid:
    """Every message answered twice: by one node per client (``reference``) and by hosts
    (``hosted``); the reference's replies go on to the server, cast to the dtype of the
    tensors it sent, and the largest difference between the two of every reply is kept."""

    def __init__(self, reference: ClientAppGrid, hosted: HostedGrid):
        self.reference, self.hosted = reference, hosted
        self.differences: list[float] = []
        self.relative: list[float] = []
        self.compared = 0
        self.ranks_seen: set[int] = set()

    def get_node_ids(self):
        return self.hosted.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        hosted = {r.metadata.src_node_id: r for r in self.hosted.send_and_receive(messages)}
        reference = []
        for message in messages:
            partition_id = message.metadata.dst_node_id - virtual_node_id(0)
            plain = Message(message.content, dst_node_id=100 + partition_id,  # the reference's ids
                            message_type=message.metadata.message_type)
            reference.append(self.reference.send_and_receive([plain])[0])
        replies = []
        for message, expected in zip(messages, reference):
            got = hosted[message.metadata.dst_node_id]
            assert expected.has_error() == got.has_error(), (expected, got)
            if expected.has_error():
                replies.append(Message(expected.error, reply_to=message))
                continue
            self.compare(expected.content, got.content)
            replies.append(Message(self.as_sent(expected.content, message.content), reply_to=message))
        return replies

    def compare(self, expected: RecordDict, got: RecordDict) -> None:
        self.compared += 1
        assert sorted(expected.keys()) == sorted(got.keys())
        left = expected["arrays"].to_torch_state_dict() if "arrays" in expected else {}
        right = got["arrays"].to_torch_state_dict() if "arrays" in got else {}
        assert sorted(left) == sorted(right)
        for key in left:
            difference = (left[key].double() - right[key].double()).abs().max().item()
            self.differences.append(difference)
            norm = left[key].double().norm().item()
            self.relative.append((left[key].double() - right[key].double()).norm().item() / max(norm, 1e-30))
        for key in left:  # the rank a reply was trained at (its A factors' rows)
            if key.endswith("lora_A.weight"):
                self.ranks_seen.add(left[key].shape[0])
        left_metrics, right_metrics = dict(expected["metrics"]), dict(got["metrics"])
        assert sorted(left_metrics) == sorted(right_metrics)
        for key, value in left_metrics.items():
            if key == "train_loss":
                self.differences.append(abs(value - right_metrics[key]))
            elif key != "pid":
                assert value == right_metrics[key], key

    @staticmethod
    def as_sent(content: RecordDict, sent: RecordDict) -> RecordDict:
        """The reply with its tensors in the server's dtype (the clients' model may be float64)."""
        if "arrays" not in content.array_records:
            return content
        sent_arrays = sent["arrays"].to_torch_state_dict() if "arrays" in sent.array_records else {}
        arrays = {k: v.to(sent_arrays[k].dtype if k in sent_arrays else torch.float32)
                  for k, v in content["arrays"].to_torch_state_dict().items()}
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})


@pytest.fixture
def float64_clients(monkeypatch):
    """The clients' model (``cached_model``) in float64; the server's stays float32."""
    built = {}

    def float64_model(spec, device):
        if (spec, device) not in built:
            built[spec, device] = models.build_model(spec, device)
            built[spec, device].model.double()
        return built[spec, device]

    monkeypatch.setattr(models, "_cached_model", float64_model)


def twin_run(cfg: RunConfig, out: Path, hosts: int, client_batch: int, caplog) -> TwinGrid:
    """Both engines on the same messages; no chunk may have fallen back to one at a time."""
    twin = TwinGrid(ClientAppGrid(cfg.clients), hosted_grid(cfg, hosts, client_batch))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        serve(twin, cfg, out)
    assert "trained together failed" not in caplog.text
    return twin


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_batched_rounds_equal_one_client_at_a_time_in_float64_classification(
        strategy, bert_folder, float64_clients, tmp_path, caplog):
    # Execute: 6 sampled clients a round on 2 hosts, trained 2 at a time (chunks of 2 or 1)
    twin = twin_run(topic_config(strategy, bert_folder), tmp_path, hosts=2, client_batch=2, caplog=caplog)

    # Assert: every reply of every round (and the set-up's) within 1e-10
    assert twin.compared >= 12
    assert max(twin.differences) <= 1e-10


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_batched_rounds_equal_one_client_at_a_time_in_float64_causal_lm(
        strategy, dropout_llama_folder, sft_data, float64_clients, tmp_path, caplog):
    # Execute: all 4 clients in one pass
    twin = twin_run(sft_run_config(strategy, dropout_llama_folder, sft_data), tmp_path, hosts=1,
                    client_batch=4, caplog=caplog)

    # Assert
    assert twin.compared >= 8
    assert max(twin.differences) <= 1e-10


@pytest.mark.parametrize("strategy", ["fedavg", "flora", "flexlora", "hetlora"])
def test_batched_clients_of_different_ranks_equal_one_client_at_a_time_in_float64(
        strategy, bert_folder, float64_clients, tmp_path, caplog):
    # Prepare: partition p at rank [1, 2][p % 2] on host p % 3, so every host holds clients of
    # both ranks (trained in separate chunks); HetLoRA's pruning clients train alone
    cfg = topic_config(strategy, bert_folder, client_ranks=[1, 2])

    # Execute
    twin = twin_run(cfg, tmp_path, hosts=3, client_batch=2, caplog=caplog)

    # Assert: every reply within 1e-10, and replies of both ranks were compared
    assert twin.compared >= 12
    assert max(twin.differences) <= 1e-10
    assert twin.ranks_seen == {1, 2}


# float32 (the default): what "the same up to rounding" means in numbers, measured on these
# runs at 4e-7 (AdamW's normalised steps keep differences at the scale of float32 rounding).
FP32_TOLERANCE = 1e-5


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_batched_rounds_in_float32_stay_within_the_stated_tolerance(strategy, bert_folder, tmp_path,
                                                                    caplog):
    # Execute
    twin = twin_run(topic_config(strategy, bert_folder), tmp_path, hosts=2, client_batch=3,
                    caplog=caplog)

    # Assert: every tensor and loss within 1e-5, and each tensor's difference within 1e-5 of
    # its norm
    assert twin.compared >= 12
    assert max(twin.differences) <= FP32_TOLERANCE and max(twin.relative) <= FP32_TOLERANCE


def assert_same_rows_up_to_tolerance(first: list[dict], second: list[dict], test_size: int):
    """Rows equal but for float32 rounding: counts, bytes and epsilon exactly; losses within
    the tolerance; the accuracy within one test example (a prediction near a tie may flip)."""
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert set(a) == set(b)
        for key, value in a.items():
            if key in ("loss", "train_loss") and value is not None:
                assert abs(value - b[key]) <= FP32_TOLERANCE, (key, a["round"], value, b[key])
            elif key == "accuracy":
                assert abs(value - b[key]) <= 1 / test_size + 1e-12, (a["round"], value, b[key])
            else:
                assert value == b[key], (key, a["round"], value, b[key])


def test_the_same_seed_gives_the_same_results_batched_or_not(bert_folder, tmp_path):
    # Prepare
    cfg = topic_config("fedsvd", bert_folder, rounds=3)
    batched = topic_config("fedsvd", bert_folder, rounds=3, client_batch=3)

    # Execute
    serve(ClientAppGrid(cfg.clients), cfg, tmp_path / "nodes")
    serve(hosted_grid(batched, batched.hosts, 3), batched, tmp_path / "batched")

    # Assert
    test_size = len(cfg.task_spec().dataset().test.labels)
    assert_same_rows_up_to_tolerance(rows_of(tmp_path / "nodes"), rows_of(tmp_path / "batched"),
                                     test_size)


@pytest.mark.parametrize("server_side", [
    # publish_participation: the test compares who was sampled, which client-level DP keeps secret
    {"dp": {"mode": "client", "epsilon": 8.0, "publish_participation": True}, "weighting": "uniform"},
    {"weighting": "fedau", "participation": {"name": "bernoulli", "mean_p": 0.1}}],
    ids=["client-level-dp", "fedau"])
def test_client_level_dp_and_fedau_are_unaffected_by_batching(server_side, bert_folder, tmp_path):
    # Prepare: both act on the server, on the unpacked replies of each client
    cfg = topic_config("fedavg", bert_folder, rounds=3, **server_side)
    batched = topic_config("fedavg", bert_folder, rounds=3, client_batch=3, **server_side)

    # Execute
    serve(ClientAppGrid(cfg.clients), cfg, tmp_path / "nodes")
    serve(hosted_grid(batched, 2, 3), batched, tmp_path / "batched")

    # Assert: the same participants, counts, bytes and epsilon; losses within the tolerance
    nodes, hosted = rows_of(tmp_path / "nodes"), rows_of(tmp_path / "batched")
    test_size = len(cfg.task_spec().dataset().test.labels)
    assert_same_rows_up_to_tolerance(nodes, hosted, test_size)
    if "dp" in server_side:
        assert nodes[-1]["epsilon"] > 0
    assert (tmp_path / "nodes" / "participation.csv").read_text() == \
        (tmp_path / "batched" / "participation.csv").read_text()


def test_a_failed_chunk_is_trained_again_client_by_client(bert_folder, tmp_path, monkeypatch, caplog):
    # Prepare: every pass of several clients fails (as one client's bad data would make it)
    import fedlora.clients.app as client_app

    def failing(*args, **kwargs):
        raise ValueError("an example has no response tokens to compute a loss on")

    monkeypatch.setattr(client_app, "train_together", failing)
    cfg = topic_config("fedex", bert_folder, faults={"crash_prob": 0.2})
    batched = topic_config("fedex", bert_folder, faults={"crash_prob": 0.2}, client_batch=3)

    # Execute
    serve(ClientAppGrid(cfg.clients), cfg, tmp_path / "nodes")
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        serve(hosted_grid(batched, 2, 3), batched, tmp_path / "batched")

    # Assert: each client trained alone, so the run is the one-node-per-client run exactly
    assert "trained together failed (ValueError: an example has no response tokens" in caplog.text
    assert rows_of(tmp_path / "batched") == rows_of(tmp_path / "nodes")
