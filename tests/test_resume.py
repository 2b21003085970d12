"""Checkpoint, exact resume and failures in the server loop (``fedlora.run.server.run_server``).

In process, on the fake grid and tiny model of ``tests.test_server_loop``: a run is killed by an
exception in round 6 (after its round-5 row, but with ``checkpoint_every=2`` its checkpoint is
of round 4), then resumed on a new grid whose nodes have new ids and empty state, as after a
real restart. Its final adapter and results must equal those of an uninterrupted run, bit for
bit. The fake clients train from a seed of (round, partition), as the ClientApp does, and some
of them fail (error replies, a NaN update) on a fixed schedule.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Error, Message

from fedlora.run.checkpoint import CHECKPOINT, FINAL_ADAPTER, load_checkpoint
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig
from fedlora.report.comm import STATE_LOST
from fedlora.report.results import read_results
from fedlora.tasks.classification import TextDataset, TextSplit
from fedlora.run.server import run_server
from fedlora.strategies import STRATEGIES
from tests.federation import ALPHA, M, N, RANK, SIZES, FakeClient, reply
from tests.test_server_loop import LABELS, TEXTS, FakeGrid, make_tiny_bundle

pytestmark = pytest.mark.usefixtures("flower_task")

ROUNDS = 10


class Killed(Exception):
    """Stands for a SIGKILL of the server in the middle of a round."""


class SeededGrid(FakeGrid):
    """Clients train from a (round, partition) seed; partition 1 crashes in rounds 2 and 7,
    partition 2 sends NaN in round 3, partition 3's reply is lost (a timeout) in round 4; the
    grid dies when round ``kill_in`` is sent."""

    def __init__(self, clients, kill_in: int | None = None):
        super().__init__(clients)
        self.kill_in = kill_in

    def send_and_receive(self, messages, timeout=None):
        if not messages or messages[0].metadata.message_type == "query.describe":
            return super().send_and_receive(messages, timeout)
        if messages[0].metadata.message_type == SETUP_MESSAGE_TYPE:
            return [self.gradients(m) for m in messages]
        replies = []
        for message in messages:
            client = self.clients[message.metadata.dst_node_id]
            server_round = int(message.content["config"]["server-round"])
            if server_round == self.kill_in:
                raise Killed(f"server killed in round {server_round}")
            if (server_round, client.partition_id) == (4, 3):
                continue
            if (server_round, client.partition_id) in ((2, 1), (7, 1)):
                replies.append(Message(Error(code=0, reason="ClientApp raised: simulated crash"),
                                       reply_to=message))
                continue
            update = client.train(message, seed=1000 * server_round + client.partition_id, step=0.05)
            if (server_round, client.partition_id) == (3, 2):
                update = reply(message, {k: v * float("nan") for k, v in client.update.items()},
                               client.num_examples)
            replies.append(update)
        return replies


    def gradients(self, message):
        """Fed-SB's round 0: a seeded gradient sum per adapted base weight."""
        gen = torch.Generator().manual_seed(self.clients[message.metadata.dst_node_id].partition_id)
        return reply(message, {f"{layer}.base.weight": torch.randn(M, N, generator=gen)
                               for layer in ("query", "value")}, 4)


def make_run(strategy: str, **overrides) -> tuple[RunConfig, TextDataset]:
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 4, "clients_per_round": 3,
                               "rounds": ROUNDS, "rank": RANK, "alpha": ALPHA, "max_length": 8,
                               "checkpoint_every": 2, **overrides})
    return cfg, TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("x", "y", "z"))


def fresh_clients(bundle, first_node_id: int) -> dict[int, FakeClient]:
    """Nodes with an empty state, as after a restart (Flower gives them new ids)."""
    return {first_node_id + p: FakeClient(p, SIZES[p], bundle.initial_state) for p in range(4)}


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


def states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# Each method's run exercises something of its own (weighting, participation); a method not
# listed runs with the defaults.
SETTINGS = {
    "fedavg": {},
    "ffa": {"weighting": "uniform"},
    "fedsb": {"fedsb": {"init_samples": 4}},
    "fedsvd": {"weighting": "fedau"},
    "lorafair": {"lorafair": {"steps": 5}},
    "fedex": {"weighting": "fedau", "participation": {"name": "bernoulli", "mean_p": 0.6}},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(strategy, tmp_path):
    # Prepare: the uninterrupted reference (every server process builds its own model)
    cfg, data = make_run(strategy, **SETTINGS.get(strategy, {}))
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    bundle = make_tiny_bundle(latent=STRATEGIES[strategy].latent)
    reference = run_server(SeededGrid(fresh_clients(bundle, 100)), cfg, reference_dir, bundle, data)

    # Execute: killed in round 6, then resumed on new nodes
    bundle = make_tiny_bundle(latent=STRATEGIES[strategy].latent)
    with pytest.raises(Killed):
        run_server(SeededGrid(fresh_clients(bundle, 100), kill_in=6), cfg, run_dir, bundle, data)
    rows_at_kill = rows_of(run_dir)
    checkpoint_round = load_checkpoint(run_dir)["round"]
    bundle = make_tiny_bundle(latent=STRATEGIES[strategy].latent)
    resumed = run_server(SeededGrid(fresh_clients(bundle, 500)), cfg, run_dir, bundle, data,
                         resume=True)

    # Assert: the kill came after the round-5 row, the checkpoint is of round 4
    assert [r["round"] for r in rows_at_kill] == list(range(6)) and checkpoint_round == 4
    # The file was only appended to, and round 5 (redone identically) is not in it twice.
    assert rows_of(run_dir)[:6] == rows_at_kill
    assert without_timing(rows_of(run_dir)) == without_timing(rows_of(reference_dir))
    assert [r["round"] for r in rows_of(run_dir)] == list(range(ROUNDS + 1))
    final = torch.load(run_dir / FINAL_ADAPTER)
    expected = torch.load(reference_dir / FINAL_ADAPTER)
    assert states_equal(final["adapter"], expected["adapter"])
    assert (final["base_delta"] is None) == (expected["base_delta"] is None)
    if expected["base_delta"] is not None:  # FedEx: the residuals folded into W0
        assert states_equal(final["base_delta"], expected["base_delta"])
    for key in ("final_accuracy", "bytes_up_total", "bytes_down_total", "clients_failed_total",
                "params_up_per_client"):
        assert resumed[key] == reference[key], key
    assert resumed["resumed_after_rounds"] == [4] and reference["resumed_after_rounds"] == []
    # A method whose nodes keep state re-sends what the new nodes lost, counted apart, where
    # the next message does not carry it anyway (FedSVD, period 1, sends every node the new A
    # after each re-factorisation).
    if not keeps_state(strategy):
        assert resumed["recovery_bytes_down"] == 0
    if strategy in ("fedsb", "fedex"):
        assert resumed["recovery_bytes_down"] > 0
    assert reference["recovery_bytes_down"] == 0
    # The failures were counted: a crash in rounds 2 and 7 and a NaN in round 3, where sampled.
    assert reference["clients_failed_total"] == sum(r["clients_failed"] for r in rows_of(reference_dir))


RESTART = 5  # partition 2's SuperNode restarts between rounds 4 and 5


def keeps_state(strategy: str) -> bool:
    """Whether the method's nodes keep something in Context.state (kept parts, a base delta)."""
    return bool(STRATEGIES[strategy].kept_parts) or STRATEGIES[strategy].keeps_node_state is True


REJOIN_SETTINGS = {**SETTINGS, "fedsvd": {"fedsvd": {"period": 3}},  # A kept between re-factorisations
                   "fedex": {"weighting": "fedau"}}


class RestartingGrid(SeededGrid):
    """SeededGrid whose partition-2 node restarts, with an empty state, once round
    ``RESTART - 1`` is answered: under the same node id (as with node authentication) or under
    ``new_id`` (as without). ``crash_in_restart_round``: instead, that node only fails round
    ``RESTART`` (the reference for a same-id restart)."""

    def __init__(self, clients, new_id: int | None = None, crash_in_restart_round: bool = False):
        super().__init__(clients)
        self.new_id, self.crash_instead = new_id, crash_in_restart_round

    def send_and_receive(self, messages, timeout=None):
        train = messages and messages[0].metadata.message_type == "train"
        server_round = int(messages[0].content["config"]["server-round"]) if train else None
        if server_round == RESTART and self.crash_instead:
            crashed = [m for m in messages if self.clients[m.metadata.dst_node_id].partition_id == 2]
            others = [m for m in messages if m not in crashed]
            return super().send_and_receive(others, timeout) + [
                Message(Error(code=0, reason="ClientApp raised: simulated crash"), reply_to=m) for m in crashed]
        replies = []
        for message in messages:
            try:
                replies += super().send_and_receive([message], timeout)
            except RuntimeError as error:  # how Flower answers for a ClientApp that raised
                replies.append(Message(Error(code=0, reason=f"RuntimeError: {error}"), reply_to=message))
        if server_round == RESTART - 1 and not self.crash_instead:
            node = next(n for n, c in self.clients.items() if c.partition_id == 2)
            fresh = FakeClient(2, SIZES[2], self.clients[node].initial)
            if self.new_id is not None:
                del self.clients[node]
                node = self.new_id
            self.clients[node] = fresh
        return replies


@pytest.mark.parametrize("same_id", [True, False], ids=["same-id", "new-id"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_restarted_node_gets_back_what_it_lost(strategy, same_id, tmp_path):
    """A SuperNode that restarts mid-run with an empty Context.state is made whole: under a new
    id at once (the server sees the id before the round), under the same id after its first
    reply, which fails saying it lost its state. The run then equals, bit for bit, an
    uninterrupted run (new id) or one where that node only crashed in that round (same id)."""
    cfg, data = make_run(strategy, clients_per_round=4, **REJOIN_SETTINGS.get(strategy, {}))
    latent = STRATEGIES[strategy].latent
    fails_once = same_id and keeps_state(strategy)
    # Prepare: the reference run
    reference = run_server(RestartingGrid(fresh_clients(make_tiny_bundle(latent), 100),
                                          crash_in_restart_round=fails_once) if fails_once else
                           SeededGrid(fresh_clients(make_tiny_bundle(latent), 100)),
                           cfg, tmp_path / "reference", make_tiny_bundle(latent), data)
    # Execute
    bundle = make_tiny_bundle(latent)
    restarted = run_server(RestartingGrid(fresh_clients(bundle, 100), new_id=None if same_id else 777),
                           cfg, tmp_path / "run", bundle, data)
    # Assert
    rows, reference_rows = rows_of(tmp_path / "run"), rows_of(tmp_path / "reference")
    # the same rows but for timing and why partition 2 failed (lost state here, a crash there)
    assert ([{k: v for k, v in row.items() if k != "rejected"} for row in without_timing(rows)]
            == [{k: v for k, v in row.items() if k != "rejected"}
                for row in without_timing(reference_rows)])
    assert rows[RESTART]["clients_failed"] == (1 if fails_once else 0)
    rejected, crashed = ([(r["round"], r["partition"], r["reason"])
                          for row in run_rows for r in row.get("rejected", [])]
                         for run_rows in (rows, reference_rows))
    assert ([e for e in rejected if e[:2] != (RESTART, 2)]
            == [e for e in crashed if e[:2] != (RESTART, 2)])
    assert ([STATE_LOST in why for *where, why in rejected if tuple(where) == (RESTART, 2)]
            == ([True] if fails_once else []))
    final = torch.load(tmp_path / "run" / FINAL_ADAPTER)
    expected = torch.load(tmp_path / "reference" / FINAL_ADAPTER)
    assert states_equal(final["adapter"], expected["adapter"])
    if expected["base_delta"] is not None:
        assert states_equal(final["base_delta"], expected["base_delta"])
    # What the node lost was re-sent (counted apart from the rows), only where it kept something
    # (a method whose next message carries every kept part anyway, as RoLoRA's after the
    # round it missed, needs nothing extra; the three below do)
    if not keeps_state(strategy):
        assert restarted["recovery_bytes_down"] == 0
    if strategy in ("fedsb", "fedsvd", "fedex"):
        assert restarted["recovery_bytes_down"] > 0
    assert reference["recovery_bytes_down"] == 0


def test_failed_clients_are_counted_and_left_out(tmp_path):
    tiny_bundle = make_tiny_bundle()
    # Prepare: all 4 clients every round, so every scheduled failure happens
    cfg, data = make_run("fedavg", clients_per_round=4, rounds=4)

    # Execute
    run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data)

    # Assert: round 2 a crash, round 3 a NaN update, round 4 no reply: 3 of 4 trained
    rows = rows_of(tmp_path)
    assert [r["clients_failed"] for r in rows] == [0, 0, 1, 1, 1]
    assert [r["clients_trained"] for r in rows] == [0, 4, 3, 3, 3]


def test_round_with_fewer_than_min_clients_valid_replies_is_not_aggregated(tmp_path):
    tiny_bundle = make_tiny_bundle()
    # Prepare: 4 clients a round, 4 needed: rounds 2 and 3 lose one each
    cfg, data = make_run("fedavg", clients_per_round=4, rounds=3, min_clients=4)

    # Execute
    summary = run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data)

    # Assert: rounds 2 and 3 changed nothing, so the model stays round 1's
    rows = rows_of(tmp_path)
    assert [r["clients_trained"] for r in rows] == [0, 4, 0, 0]
    assert [r["clients_failed"] for r in rows] == [0, 0, 1, 1]
    assert rows[1]["accuracy"] == rows[2]["accuracy"] == rows[3]["accuracy"]
    assert rows[1]["loss"] == rows[3]["loss"]
    assert summary["rounds_not_aggregated"] == 2


def test_resume_of_a_finished_run_writes_nothing_new(tmp_path):
    tiny_bundle = make_tiny_bundle()
    cfg, data = make_run("fedavg", rounds=2)
    run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data)
    before = (tmp_path / "results.jsonl").read_text()

    summary = run_server(SeededGrid(fresh_clients(tiny_bundle, 300)), cfg, tmp_path, tiny_bundle,
                         data, resume=True)

    assert (tmp_path / "results.jsonl").read_text() == before
    assert summary["resumed_after_rounds"] == [2]


def test_checkpoint_is_replaced_atomically_and_holds_the_state(tmp_path):
    tiny_bundle = make_tiny_bundle()
    cfg, data = make_run("fedsvd", rounds=3, checkpoint_every=1)
    run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data)

    checkpoint = load_checkpoint(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert checkpoint["round"] == 3 and len(checkpoint["rows"]) == 4
    assert checkpoint["strategy"]["a_version"] == 3  # FedSVD re-factorised every round
    assert set(checkpoint["rng"]) == {"python", "numpy", "torch"}
    assert checkpoint["ledger"]["rounds"][3]["up"]
    final = torch.load(tmp_path / FINAL_ADAPTER)["adapter"]
    assert states_equal(final, checkpoint["arrays"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    tiny_bundle = make_tiny_bundle()
    cfg, data = make_run("fedavg", rounds=2, checkpoint_every=0)
    run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data)

    assert not (tmp_path / CHECKPOINT).exists()
    with pytest.raises(FileNotFoundError, match="wrote no checkpoint"):
        run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, tmp_path, tiny_bundle, data,
                   resume=True)


def test_resumed_writer_appends_only_rows_that_differ_from_those_on_file(tmp_path):
    # Prepare: a killed run wrote rounds 0-2, its checkpoint holds rounds 0-1
    from fedlora.report.results import ROW_FIELDS, ResultsWriter

    def row(r, accuracy, wall_s):
        return {**dict.fromkeys(ROW_FIELDS, 0), "round": r, "accuracy": accuracy, "loss": 1.0,
                "clients_failed": 0, "bytes_up_cum": 0, "bytes_down_cum": 0, "wall_s": wall_s}

    first = ResultsWriter(tmp_path, {"seed": 0}, 4)
    for r in range(3):
        first.row(row(r, 0.5 + r / 10, r))
    first.close()
    before = (tmp_path / "results.jsonl").read_text()

    # Execute: the resumed run redoes round 2 identically (but for wall_s), then round 3 ...
    resumed = ResultsWriter(tmp_path, {"seed": 1}, 4, resumed_rows=first.rows[:2])
    resumed.row(row(2, 0.7, 99.0))
    resumed.row(row(3, 0.8, 100.0))
    resumed.close()
    # ... and a second resume from the same checkpoint redoes round 2 differently.
    again = ResultsWriter(tmp_path, {"seed": 1}, 4, resumed_rows=first.rows[:2])
    again.row(row(2, 0.75, 101.0))
    again.close()

    # Assert: appended only; round 2 once, then its redone, different row marked
    text = (tmp_path / "results.jsonl").read_text()
    assert text.startswith(before)
    rows = rows_of(tmp_path)
    assert [(r["round"], r.get("redone", False)) for r in rows] == [(0, False), (1, False), (2, False),
                                                                   (3, False), (2, True)]
    assert rows[-1]["accuracy"] == 0.75
    assert "seed: 0" in (tmp_path / "config.yaml").read_text()  # the original config stays


def test_resume_after_a_row_cut_short_by_the_kill(tmp_path):
    # Prepare: a run killed while writing its round-3 row (checkpoint: round 2)
    tiny_bundle = make_tiny_bundle()
    cfg, data = make_run("fedavg", rounds=4, checkpoint_every=2)
    reference = tmp_path / "reference"
    run_server(SeededGrid(fresh_clients(tiny_bundle, 100)), cfg, reference, make_tiny_bundle(), data)
    with pytest.raises(Killed):
        run_server(SeededGrid(fresh_clients(tiny_bundle, 100), kill_in=4), cfg, tmp_path,
                   make_tiny_bundle(), data)
    text = (tmp_path / "results.jsonl").read_text()
    (tmp_path / "results.jsonl").write_text(text[:-20])

    # Execute
    run_server(SeededGrid(fresh_clients(tiny_bundle, 300)), cfg, tmp_path, make_tiny_bundle(), data,
               resume=True)

    # Assert: the cut line stays (nothing is truncated), the rows are read without it
    assert (tmp_path / "results.jsonl").read_text().startswith(text[:-20] + "\n")
    assert without_timing(read_results(tmp_path)) == without_timing(rows_of(reference))
