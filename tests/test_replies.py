"""Malformed and malicious replies never touch the server's state (``fedlora.strategies.replies``).

A table of bad replies, each sent beside honest ones, through the three doors a reply comes in
by: a training round (``aggregate_train``), Fed-SB's set-up round (``initialize``) and
``query.describe`` (``fedlora.run.server.describe_nodes``). For each: no exception, the bad
reply alone is dropped with its reason, and the global state is finite and equal, bit for bit,
to what the honest replies alone give (a twin strategy that never saw the bad one); under DP
the ledger never keeps the bad reply's accountant. A whole run (``run_server``) with a node
failing at each door finishes and lists every rejection in ``results.jsonl``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig
from fedlora.model.adapters import factor_key, part_of
from fedlora.run.server import describe_nodes, run_server
from fedlora.tasks.classification import TextDataset, TextSplit
from tests.federation import F64, HEAD_KEYS, HISTOGRAMS, LAYERS, M, N, SIZES, FakeClient, Federation
from tests.test_server_loop import LABELS, TEXTS, FakeGrid, make_tiny_bundle

pytestmark = pytest.mark.usefixtures("flower_task")

BAD_NODE = 100  # partition 0, which described 10 examples (``SIZES[0]``)


def accountant(**changes) -> dict:
    """A well-formed record-level DP accountant, as ``ClientPrivacy.metrics`` reports it."""
    metrics = {"dp-noise-multiplier": 1.2, "dp-sample-rate": 0.25, "dp-delta": 1e-5,
               "dp-epsilon": 0.8, "dp-sigmas": [1.2], "dp-rates": [0.25], "dp-steps": [2],
               "dp-release-kinds": [0], "dp-release-rounds": [1], "dp-release-sigmas": [1.2],
               "dp-release-rates": [0.25], "dp-release-steps": [2]}
    metrics.update(changes)
    return {k: v for k, v in metrics.items() if v is not None}


def rebuilt(message: Message, arrays: dict, metrics: dict | None) -> Message:
    """A reply to ``message`` with these arrays and metrics (no metrics record: None)."""
    content = RecordDict({"arrays": ArrayRecord(arrays)})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=message)


def with_metrics(**changes):
    """A bad reply that changes (a value of None: drops) metrics of an honest one."""
    def bad(message, arrays, metrics):
        merged = {**metrics, **changes}
        return rebuilt(message, arrays, {k: v for k, v in merged.items() if v is not None})
    return bad


def with_arrays(change):
    def bad(message, arrays, metrics):
        return rebuilt(message, change(arrays), metrics)
    return bad


def first_factor(arrays: dict) -> str:
    return next(k for k in arrays if part_of(k, HEAD_KEYS) != "head")


def huge(arrays):  # the largest finite value of the dtype: 1.8e308 in float64, 3.4e38 in float32
    return {k: torch.full_like(v, torch.finfo(v.dtype).max) for k, v in arrays.items()}


def shifted(arrays, by=2e6):  # one coordinate moved past the default max_update_norm (1e6)
    key = first_factor(arrays)
    moved = arrays[key].clone()
    moved[0, 0] += by
    return {**arrays, key: moved}


def wrong_shape(arrays):
    key = first_factor(arrays)
    return {**arrays, key: torch.zeros(3, 7, dtype=arrays[key].dtype)}


def error_reply(message, arrays, metrics):
    return Message(Error(code=0, reason="ClientApp raised: out of memory"), reply_to=message)


def no_metrics(message, arrays, metrics):
    return rebuilt(message, arrays, None)


def from_a_stranger(message, arrays, metrics):
    stranger = Message(RecordDict(), message_type="train", dst_node_id=999)
    return rebuilt(stranger, arrays, metrics)


DP = {"dp": {"epsilon": 3.0}}
# reproducible server noise: the twin that sees only the honest replies must draw the same noise
CLIENT_DP = {"dp": {"epsilon": 3.0, "mode": "client", "reproducible_noise": True},
             "weighting": "uniform",
             "clients_per_round": 2, "rounds": 8}

# (id, strategy, config overrides, the bad reply, what its reason says)
TRAIN_CASES = [
    ("update of 1.8e308", "fedavg", {}, with_arrays(huge), "above max_update_norm=1e+06"),
    ("update past max_update_norm", "fedsb", {}, with_arrays(shifted), "above max_update_norm"),
    ("a tighter max_update_norm", "ffa", {"max_update_norm": 5.0},
     with_arrays(lambda a: shifted(a, 10.0)), "above max_update_norm=5"),
    ("num-examples 1e15", "fedavg", {}, with_metrics(**{"num-examples": 10 ** 15}),
     "more than the 10 examples the node described"),
    ("num-examples one above its size", "lorafair", {}, with_metrics(**{"num-examples": 11}),
     "more than the 10 examples"),
    ("num-examples NaN", "fedavg", {}, with_metrics(**{"num-examples": float("nan")}),
     "'num-examples' is not a finite number"),
    ("num-examples Inf", "fedsvd", {}, with_metrics(**{"num-examples": float("inf")}),
     "'num-examples' is not a finite number"),
    ("num-examples negative", "fedavg", {}, with_metrics(**{"num-examples": -3}),
     "not a positive integer"),
    ("num-examples fractional", "fedex", {}, with_metrics(**{"num-examples": 2.5}),
     "not a positive integer"),
    ("num-examples missing", "rolora", {}, with_metrics(**{"num-examples": None}),
     "lacks 'num-examples'"),
    ("train_loss NaN", "fedavg", {}, with_metrics(train_loss=float("nan")),
     "'train_loss' is not a finite number"),
    ("a list metric with Inf", "fedavg", {}, with_metrics(extra=[1.0, float("inf")]),
     "'extra' is not a finite number"),
    ("another partition's id", "fedavg", {}, with_metrics(**{"partition-id": 3}),
     "names partition 3, the node holds 0"),
    ("a wrong shape", "fedsb", {}, with_arrays(wrong_shape), "has shape (3, 7)"),
    ("no metrics record", "fedavg", {}, no_metrics, "lacks 'arrays' or 'metrics'"),
    ("a stranger's reply", "fedavg", {}, from_a_stranger, "unknown node 999"),
    ("an error reply", "fedavg", {}, error_reply, "client error: ClientApp raised"),
    ("DP: only dp-epsilon", "fedavg", DP,
     lambda m, a, _: rebuilt(m, a, {"num-examples": 10, "dp-epsilon": 1.0}),
     "lacks 'dp-noise-multiplier'"),
    ("DP: no accountant at all", "fedavg", DP,
     lambda m, a, metrics: rebuilt(m, a, {k: v for k, v in metrics.items()
                                          if not k.startswith("dp-")}),
     "DP accountant: the accountant lacks"),
    ("DP: unknown release kind", "fedavg", DP, with_metrics(**{"dp-release-kinds": [9]}),
     "'dp-release-kinds' is 9"),
    ("DP: negative epsilon", "fedsb", DP, with_metrics(**{"dp-epsilon": -5.0}),
     "'dp-epsilon' is -5.0"),
    ("DP: sample rate above 1", "fedavg", DP, with_metrics(**{"dp-sample-rate": 2.0}),
     "'dp-sample-rate' is 2.0"),
    ("DP: delta 0", "fedavg", DP, with_metrics(**{"dp-delta": 0.0}), "'dp-delta' is 0.0"),
    ("DP: history of unequal lengths", "fedavg", DP, with_metrics(**{"dp-steps": [2, 3]}),
     "differ in length"),
    ("DP: half a release log", "fedavg", DP, with_metrics(**{"dp-release-steps": None}),
     "lacks ['dp-release-steps']"),
    ("DP: fractional steps", "fedavg", DP, with_metrics(**{"dp-steps": [1.5]}),
     "'dp-steps' is 1.5, not an integer"),
    ("DP: dp-declined 7", "fedavg", DP, with_metrics(**{"dp-declined": 7}), "'dp-declined' is 7"),
    ("client-level DP: update of 1.8e308", "fedavg", CLIENT_DP, with_arrays(huge),
     "above max_update_norm"),
]


def honest_replies(fed: Federation, messages: list[Message], dp: bool) -> list[Message]:
    replies = fed.train(messages)
    if not dp:
        return replies
    return [rebuilt(m, r.content["arrays"].to_torch_state_dict(),
                    {**r.content["metrics"], **accountant(**{"dp-epsilon": 0.5 + 0.1 * i})})
            for i, (m, r) in enumerate(zip(messages, replies))]


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_a_bad_train_reply_is_dropped_with_its_reason_and_the_round_goes_on(case):
    # Prepare: the bad node's reply replaced, a twin strategy that sees only the honest ones
    _, strategy, overrides, make_bad, reason = case
    fed = Federation(strategy, **overrides)
    dp = fed.cfg.dp.record_level
    messages = fed.configure()
    while BAD_NODE not in [m.metadata.dst_node_id for m in messages] or len(messages) < 2:
        fed.aggregate([])  # client-level DP samples by Poisson: wait for node 100 and another
        messages = fed.configure()
    honest = honest_replies(fed, messages, dp)
    index = [m.metadata.dst_node_id for m in messages].index(BAD_NODE)
    good = honest[:index] + honest[index + 1:]
    bad = make_bad(messages[index], honest[index].content["arrays"].to_torch_state_dict(),
                   dict(honest[index].content["metrics"]))
    twin = copy.deepcopy(fed.strategy)

    # Execute
    report = fed.strategy.aggregate_train(fed.round, [bad] + good)
    good_only = twin.aggregate_train(fed.round, good)
    fed.arrays = report.arrays or fed.arrays
    fed.run_round()  # the run goes on

    # Assert: only the honest replies were aggregated, the reason is recorded
    assert len(report.rejected) == 1 and reason in report.rejected[0][1], report.rejected
    assert report.clients_trained == good_only.clients_trained == len(good) > 0
    state = report.arrays.to_torch_state_dict()
    assert finite(state) and states_equal(state, good_only.arrays.to_torch_state_dict())
    assert report.client_reports == good_only.client_reports
    assert report.train_loss == good_only.train_loss
    if dp:  # the bad reply's accountant never reached the ledger
        assert fed.strategy.dp.ledger.clients.keys() == twin.dp.ledger.clients.keys()
        assert 0 not in twin.dp.ledger.clients
    assert finite(fed.state)


def test_the_norm_bound_is_on_the_change_of_the_global_state():
    # Prepare: a bound just above the largest change an honest update makes, far below the
    # norm of any update itself
    fed = Federation("fedavg")
    messages = fed.configure()
    replies = fed.train(messages)
    sent = fed.strategy.current
    updates = [r.content["arrays"].to_torch_state_dict() for r in replies]
    changes = [sum(float((u[k] - sent[k]).pow(2).sum()) for k in u) ** 0.5 for u in updates]
    norms = [sum(float(u[k].pow(2).sum()) for k in u) ** 0.5 for u in updates]
    assert max(changes) * 2 < min(norms)
    fed.strategy.max_update_norm = max(changes) * 1.001

    # Execute
    report = fed.strategy.aggregate_train(fed.round, replies)

    # Assert: every honest update passes, though each is further than the bound from zero
    assert report.clients_trained == len(replies) and not report.rejected


# --------------------------------------------------------------------------------------------
# Fed-SB's set-up round


class InitExchange:
    """The exchange ``FedSB.initialize`` sends its round-0 messages through: each node replies
    with a seeded gradient per adapted base weight; the first sampled node's reply is ``bad``."""

    client_config: dict = {}

    def __init__(self, bad=None, honest_only: bool = False):
        self.bad, self.honest_only = bad, honest_only

    def __call__(self, server_round, messages):
        replies = []
        for i, message in enumerate(messages):
            gen = torch.Generator().manual_seed(message.metadata.dst_node_id)
            grads = {f"{layer}.base.weight": torch.randn(M, N, generator=gen, dtype=F64)
                     for layer in LAYERS}
            metrics = {"num-examples": 4}
            if i == 0 and self.honest_only:
                continue
            replies.append(self.bad(message, grads, metrics) if i == 0 and self.bad
                           else rebuilt(message, grads, metrics))
        return replies


INIT_CASES = [
    ("gradient NaN", with_arrays(lambda g: {k: v * float("nan") for k, v in g.items()}),
     "has NaN or Inf values"),
    ("gradient of another shape",
     with_arrays(lambda g: {k: torch.zeros(2, 2, dtype=F64) for k in g}), "has shape (2, 2)"),
    ("one layer missing", with_arrays(lambda g: dict(list(g.items())[:1])),
     "missing ['encoder.0.value.base.weight']"),
    ("an extra tensor", with_arrays(lambda g: {**g, "head.weight": torch.zeros(3, N, dtype=F64)}),
     "extra ['head.weight']"),
    ("an integer gradient", with_arrays(lambda g: {k: v.long() for k, v in g.items()}),
     "floating point"),
    ("no num-examples", with_metrics(**{"num-examples": None}), "lacks 'num-examples'"),
    ("num-examples above its size", with_metrics(**{"num-examples": 10 ** 9}), "more than the 10"),
    ("an error reply", error_reply, "client error"),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_a_bad_fedsb_init_reply_is_dropped_and_every_layer_is_initialised(case):
    # Prepare
    _, make_bad, reason = case
    fed = Federation("fedsb")
    twin = copy.deepcopy(fed.strategy)

    # Execute
    arrays = fed.strategy.initialize(None, fed.arrays, InitExchange(make_bad))
    good_only = twin.initialize(None, fed.arrays, InitExchange(honest_only=True))

    # Assert: the state is the one the honest replies give; every layer was set from them
    state, expected = arrays.to_torch_state_dict(), good_only.to_torch_state_dict()
    assert finite(state) and states_equal(state, expected)
    for layer in LAYERS:
        assert not torch.equal(state[factor_key(layer, "B")], fed.state[factor_key(layer, "B")])
    assert [node for node, _ in fed.strategy.setup_rejected] == [BAD_NODE]
    assert reason in fed.strategy.setup_rejected[0][1]
    assert not twin.setup_rejected


# --------------------------------------------------------------------------------------------
# query.describe


class DescribeGrid:
    """Answers ``query.describe`` as ``FakeGrid`` does; node 100's answer is ``bad``."""

    def __init__(self, bad):
        self.bad = bad

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            partition = message.metadata.dst_node_id - 100
            metrics = {"partition-id": partition, "num-examples": SIZES[partition],
                       "label-histogram": HISTOGRAMS[partition]}
            replies.append(self.bad(message, metrics) if partition == 0
                           else Message(RecordDict({"metrics": MetricRecord(metrics)}),
                                        reply_to=message))
        return replies


def described(**changes):
    def bad(message, metrics):
        merged = {k: v for k, v in {**metrics, **changes}.items() if v is not None}
        return Message(RecordDict({"metrics": MetricRecord(merged)}), reply_to=message)
    return bad


DESCRIBE_CASES = [
    ("an error", lambda m, _: Message(Error(code=0, reason="no data"), reply_to=m), "no data"),
    ("no metrics", lambda m, _: Message(RecordDict(), reply_to=m), "lacks 'metrics'"),
    ("partition out of range", described(**{"partition-id": 7}), "not an integer in 0..3"),
    ("partition missing", described(**{"partition-id": None}), "'partition-id' is None"),
    ("num-examples NaN", described(**{"num-examples": float("nan")}), "not a finite number"),
    ("num-examples 0", described(**{"num-examples": 0}), "not a positive integer"),
    ("histogram not summing to num-examples", described(**{"label-histogram": [1, 2, 3]}),
     "summing to num-examples=10"),
    ("histogram of another length", described(**{"label-histogram": [10, 0]}), "3 counts"),
    ("negative count", described(**{"label-histogram": [11, -1, 0]}), "counts >= 0"),
]


@pytest.mark.parametrize("case", DESCRIBE_CASES, ids=[c[0] for c in DESCRIBE_CASES])
def test_a_node_that_fails_to_describe_itself_is_left_out(case, caplog):
    # Prepare
    _, make_bad, reason = case

    # Execute
    info = describe_nodes(DescribeGrid(make_bad), [100, 101, 102, 103], {"num-labels": 3}, 4)

    # Assert: the others are described as they said, the bad node is named with its reason
    assert {node: i["partition_id"] for node, i in info.items()} == {101: 1, 102: 2, 103: 3}
    assert [i["num_examples"] for i in info.values()] == list(SIZES[1:])
    assert any("node 100 did not describe itself" in r.message and reason in r.message
               for r in caplog.records)


# --------------------------------------------------------------------------------------------
# A whole run


class HostileGrid(FakeGrid):
    """Node 103 fails at describe, node 100 sends Fed-SB a gradient of the wrong shape, and
    node 101 an update of 3.4e38 (float32's largest) in round 2."""

    def send_and_receive(self, messages, timeout=None):
        kind = messages[0].metadata.message_type if messages else None
        if kind == SETUP_MESSAGE_TYPE:
            return [rebuilt(m, {f"{layer}.base.weight": torch.ones(self.gradient_shape(m))
                                for layer in ("query", "value")}, {"num-examples": 4})
                    for m in messages]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if kind == "query.describe" and node == 103:
                replies.append(Message(Error(code=0, reason="failed to load its data"),
                                       reply_to=message))
                continue
            reply = FakeGrid.send_and_receive(self, [message], timeout)[0]
            if kind == "train" and node == 101 and message.content["config"]["server-round"] == 2:
                reply = rebuilt(message, huge(reply.content["arrays"].to_torch_state_dict()),
                                dict(reply.content["metrics"]))
            replies.append(reply)
        return replies

    @staticmethod
    def gradient_shape(message) -> tuple[int, int]:
        return (2, 2) if message.metadata.dst_node_id == 100 else (M, N)


def test_a_run_with_a_bad_node_at_every_door_finishes_and_lists_each_rejection(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict({"strategy": "fedsb", "clients": 4, "clients_per_round": 4,
                               "rounds": 3, "rank": 2, "alpha": 4.0, "max_length": 8})
    data = TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("x", "y", "z"))
    bundle = make_tiny_bundle(latent=True)
    clients = {100 + p: FakeClient(p, SIZES[p], bundle.initial_state) for p in range(4)}

    # Execute
    summary = run_server(HostileGrid(clients), cfg, tmp_path, bundle, data)

    # Assert: partition 3 left out, the set-up and round-2 rejections in their rows
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert [p["partition_id"] for p in partitions] == [0, 1, 2]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["clients_trained"] for r in rows] == [0, 3, 2, 3]
    assert [r["clients_failed"] for r in rows] == [1, 0, 1, 0]
    assert [[(e["round"], e["partition"]) for e in r.get("rejected", [])] for r in rows] == \
        [[(0, 0)], [], [(2, 1)], []]
    assert "has shape (2, 2)" in rows[0]["rejected"][0]["reason"]
    assert "above max_update_norm" in rows[2]["rejected"][0]["reason"]
    assert summary["clients_failed_total"] == 2
    final = torch.load(tmp_path / "final_adapter.pt")["adapter"]
    assert finite(final)
