"""The server's side of hosted clients: a Grid on which every client is a node of its own.

With ``client_batch`` > 1 or ``client_hosts`` set, a simulation runs ``H`` virtual SuperNodes
("hosts") instead of one per client; partition ``p`` lives on host ``p mod H`` for the whole run
(docs/design/client-batching.md). ``HostedGrid`` wraps Flower's Grid so that the round loop and
the strategies do not know: ``get_node_ids`` gives one stable virtual node id per client
(``virtual_node_id``), ``send_and_receive`` packs the messages for one host into one Flower
message per host and message type (``fedlora.clients.host``) and unpacks each host's reply into
one reply per client, from that client's virtual node id. Every message, reply, byte count,
reply check and DP ledger entry is then what it is with one node per client.

A host whose reply is an error (it crashed, or the SuperLink answers for it) fails every client
it carried that round, each with the host's reason; a host that does not answer within the
timeout leaves its clients without a reply, as a node of their own would.
"""

from __future__ import annotations

import logging
from uuid import uuid4

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedlora.clients.host import HOSTED, pack, unpack

log = logging.getLogger("fedlora")

VIRTUAL_NODE_BASE = 1 << 40  # far from the SuperLink's id 1 and unlikely to meet a real one


def virtual_node_id(partition_id: int) -> int:
    """The node id the server sees for a hosted client: derived from its partition id, so it
    is the same in every round and after a restart."""
    return VIRTUAL_NODE_BASE + partition_id


def partition_of_node(node_id: int) -> int:
    return node_id - VIRTUAL_NODE_BASE


class HostedGrid:
    """Flower's ``grid`` seen as ``clients`` nodes, served by ``hosts`` real (virtual Super)
    nodes that train up to ``client_batch`` of their clients at a time."""

    def __init__(self, grid, clients: int, hosts: int, client_batch: int = 1):
        self.grid = grid
        self.clients = clients
        self.hosts = hosts
        self.client_batch = client_batch
        self.host_nodes: list[int] = []  # host index -> the real node id serving it

    # -- nodes ------------------------------------------------------------------------------

    def get_node_ids(self) -> list[int]:
        """Every client's virtual node id once all hosts are connected (none before: the
        round loop waits for all of them)."""
        real = sorted(self.grid.get_node_ids())
        if not self.host_nodes:
            if len(real) < self.hosts:
                return []
            self.host_nodes = real[:self.hosts]
        else:  # a host that came back under a new id takes the place of the one that left
            gone = [i for i, node in enumerate(self.host_nodes) if node not in real]
            new = [node for node in real if node not in self.host_nodes]
            for index, node in zip(gone, new):
                log.warning("host %d is node %s now (was %s): its clients restart with an "
                            "empty state", index, node, self.host_nodes[index])
                self.host_nodes[index] = node
        return [virtual_node_id(p) for p in range(self.clients)]

    def host_of(self, node_id: int) -> int:
        """The real node that serves the client with virtual id ``node_id``."""
        partition_id = partition_of_node(node_id)
        if not 0 <= partition_id < self.clients:
            raise ValueError(f"node {node_id} is no hosted client (partitions 0..{self.clients - 1})")
        return self.host_nodes[partition_id % self.hosts]

    # -- messages ---------------------------------------------------------------------------

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Send the clients' messages packed by host and type; the clients' replies."""
        if not self.host_nodes:
            self.get_node_ids()
        groups: dict[tuple[int, str], list[Message]] = {}
        for message in messages:
            if not message.metadata.message_id:  # the id a reply refers to (Flower's own way)
                message.metadata.__dict__["_message_id"] = str(uuid4())
            key = (self.host_of(message.metadata.dst_node_id), message.metadata.message_type)
            groups.setdefault(key, []).append(message)
        packed = {}
        for (host, message_type), group in groups.items():
            contents = {partition_of_node(m.metadata.dst_node_id): m.content for m in group}
            content = pack(contents)
            content[HOSTED] = ConfigRecord({"partition-ids": list(contents),
                                            "num-partitions": self.clients,
                                            "client-batch": self.client_batch})
            packed_message = Message(content=content, dst_node_id=host, message_type=message_type)
            packed_message.metadata.__dict__["_message_id"] = str(uuid4())  # a grid may set its own
            packed[id(packed_message)] = (packed_message, group)
        sent = [message for message, _ in packed.values()]
        host_replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        by_id = {message.metadata.message_id: group for message, group in packed.values()}
        replies = []
        for host_reply in host_replies:
            group = by_id.get(host_reply.metadata.reply_to_message_id)
            if group is None:
                log.warning("a reply to no packed message (from node %s) is ignored",
                            host_reply.metadata.src_node_id)
                continue
            replies.extend(self.unpack_reply(host_reply, group))
        return replies

    def unpack_reply(self, host_reply: Message, group: list[Message]) -> list[Message]:
        """One reply per client of ``group`` from its host's reply."""
        if host_reply.has_error():
            error = host_reply.error
            reason = f"its host node failed: {error.reason}"
            return [Message(Error(code=error.code, reason=reason), reply_to=m) for m in group]
        contents = unpack(host_reply.content)
        replies = []
        for message in group:
            content = contents.get(partition_of_node(message.metadata.dst_node_id))
            if content is None:
                replies.append(Message(Error(code=0, reason="its host node sent no reply for it"),
                                       reply_to=message))
            elif "error" in content.config_records:
                record = content["error"]
                replies.append(Message(Error(code=int(record["code"]), reason=str(record["reason"])),
                                       reply_to=message))
            else:
                replies.append(Message(content=RecordDict(dict(content)), reply_to=message))
        return replies
