"""The record of what each client holds (``fedlora.strategies.holdings.HeldParts``), on its own
and through a strategy whose nodes restart under new ids."""

import json

import pytest

from fedlora.strategies.holdings import HeldParts
from tests.federation import Federation

pytestmark = pytest.mark.usefixtures("flower_task")


def test_a_seeded_part_is_held_at_version_zero_and_a_kept_one_is_not():
    # Prepare
    record = HeldParts(kept=frozenset({"A", "B"}), seeded=frozenset({"A"}))

    # Execute / Assert: a new client holds the seed's A at its rank, and no B
    assert record.stale(3, rank=4) == ["B"]
    record.advance("A")
    assert record.stale(3, rank=4) == ["A", "B"]


def test_what_was_sent_is_held_only_once_the_reply_is_valid():
    # Prepare
    record = HeldParts(kept=frozenset({"A"}))
    record.advance("A")

    # Execute: partition 1 replies validly, partition 2 does not
    record.send(1, rank=8)
    record.send(2, rank=8)
    record.accept(1)
    record.end_round()

    # Assert
    assert record.stale(1, rank=8) == [] and record.stale(2, rank=8) == ["A"]
    assert record.history[1]["A"] == [(0, 1)] and 2 not in record.history
    # a factor held at another rank than the client now trains at is stale
    assert record.stale(1, rank=4) == ["A"]


def test_an_additive_part_is_forgotten_when_the_reply_is_lost_after_it_moved():
    # Prepare: partition 5 has added 2 rounds; the server is at 4
    record = HeldParts(additive=frozenset({"base"}))
    for _ in range(2):
        record.advance("base")
    record.send(5, rank=2)
    record.accept(5)
    record.advance("base")
    record.advance("base")

    # Execute: the message that would move it to 4 gets no valid reply
    record.send(5, rank=2)
    record.reject(5)

    # Assert: it may have added rounds 3 and 4: the next message starts from round 0
    assert record.held_version(5, "base") == 0 and record.stale(5, rank=16) == ["base"]
    assert record.history[5]["base"] == [(0, 2)]
    # a rank change does not make a rank-free part stale
    record.send(5, rank=2)
    record.accept(5)
    assert record.stale(5, rank=16) == [] and record.history[5]["base"] == [(0, 2), (0, 4)]


def test_an_additive_part_the_message_did_not_move_survives_a_lost_reply():
    record = HeldParts(additive=frozenset({"base"}))
    record.advance("base")
    record.send(0, rank=2)
    record.accept(0)
    record.send(0, rank=2)  # nothing new to add
    record.reject(0)
    assert record.held_version(0, "base") == 1


def test_the_record_round_trips_through_json():
    # Prepare
    record = HeldParts(kept=frozenset({"A"}), additive=frozenset({"base"}))
    record.advance("A")
    record.advance("base")
    record.ranks = {0: 2, 1: 16}
    for partition in (0, 1):
        record.send(partition, record.ranks[partition])
        record.accept(partition)

    # Execute
    restored = HeldParts(kept=frozenset({"A"}), additive=frozenset({"base"}))
    restored.load_state_dict(json.loads(json.dumps(record.state_dict())))

    # Assert
    assert restored.held == record.held and restored.history == record.history
    assert restored.current == record.current and restored.ranks == record.ranks


@pytest.mark.parametrize("name", ["fedsb", "fedsvd", "rolora", "fedex"])
def test_a_node_back_under_a_new_id_is_sent_what_its_partition_lacks(name):
    # Prepare: two federations, one of whose nodes all come back under new ids after round 2
    fed, twin = Federation(name, clients_per_round=3), Federation(name, clients_per_round=3)
    for federation in (fed, twin):
        federation.run_round()
        federation.run_round()
    renamed = {500 + node: client.partition_id for node, client in twin.clients.items()}
    twin.strategy.nodes_restarted(renamed)
    twin.clients = {500 + node: client for node, client in twin.clients.items()}

    # Execute
    messages, restarted = fed.configure(), twin.configure()

    # Assert: the same payloads and configs partition by partition (the record is keyed by
    # partition, not node id); only the restore record is new
    assert [m.metadata.dst_node_id + 500 for m in messages] == [m.metadata.dst_node_id for m in restarted]
    for message, again in zip(messages, restarted):
        sent, resent = (m.content["arrays"].to_torch_state_dict() for m in (message, again))
        assert sent.keys() == resent.keys() and all((sent[k] == resent[k]).all() for k in sent)
        config = {k: v for k, v in again.content["config"].items() if not k.startswith("restore-")}
        assert dict(message.content["config"]) == {**config, "expect-state": 1}
        assert "restore" not in message.content.array_records
        # (FedSVD re-factorises every round: the regular message carries the new A anyway)
        assert ("restore" in again.content.array_records) == (name != "fedsvd")
