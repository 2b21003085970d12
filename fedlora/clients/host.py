"""A node that hosts several clients: how their messages travel packed, and how it serves them.

In simulation with ``client_batch`` > 1 (or ``client_hosts`` set) one virtual SuperNode, a
*host*, serves several partitions (docs/design/client-batching.md). The server still builds one
message per client; ``fedlora.run.hosted.HostedGrid`` packs the round's messages for a host into
one Flower message of the same type, whose records are each client's, named
``<partition id>/<record>`` (``<pid>/arrays``, ``<pid>/config``, ``<pid>/restore``), plus a
``hosted`` ConfigRecord: the partition ids in order, the number of partitions and
``client-batch``. The reply carries ``<pid>/arrays`` and ``<pid>/metrics``, or ``<pid>/error``
(``code``, ``reason``) for a client that failed; ``HostedGrid`` unpacks it into one reply per
client, so the strategies see exactly the messages of a node per client.

Each hosted client keeps what a node of its own keeps in its ``Context.state`` under
``clients/<pid>/<record>`` of the host's ``Context.state`` (the place that persists across rounds;
module caches are shared by all nodes of a Ray worker). A handler serves one client with a
``Context`` of its own: that client's records, and the node config a node of its own would have
(``partition-id``, ``num-partitions``), so every handler of the ClientApp serves a hosted client
unchanged. A client's failure is its own ``<pid>/error``; the others are served normally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

HOSTED = "hosted"  # the ConfigRecord that marks a packed message
STATE_PREFIX = "clients/"  # a hosted client's records in the host's Context.state


def record_name(partition_id: int, name: str) -> str:
    """The name of one client's record inside a packed message."""
    return f"{partition_id}/{name}"


def pack(contents: dict[int, RecordDict]) -> RecordDict:
    """One RecordDict holding every client's records (``<pid>/<name>``)."""
    packed = RecordDict()
    for partition_id, content in contents.items():
        for name, record in content.items():
            packed[record_name(partition_id, name)] = record
    return packed


def unpack(packed: RecordDict) -> dict[int, RecordDict]:
    """The clients' RecordDicts of a packed message, by partition id (the ``hosted`` record
    and any name without a partition id are no client's)."""
    contents: dict[int, RecordDict] = {}
    for name, record in packed.items():
        owner, slash, inner = name.partition("/")
        if slash and owner.isdigit():
            contents.setdefault(int(owner), RecordDict())[inner] = record
    return contents


def error_record(code: int, reason: str) -> ConfigRecord:
    return ConfigRecord({"code": int(code), "reason": str(reason)})


def is_hosted(message: Message) -> bool:
    return message.has_content() and HOSTED in message.content.config_records


@dataclass
class HostedClient:
    """One client of a packed message: its own message (the host's metadata, the client's
    records) and its own ``Context``."""

    partition_id: int
    message: Message
    context: Context


def client_context(host: Context, partition_id: int, num_partitions: int) -> Context:
    """The Context a node of its own would give the client: its records of the host's
    ``Context.state``, its partition in ``node_config``."""
    prefix = f"{STATE_PREFIX}{partition_id}/"
    state = RecordDict({name[len(prefix):]: record for name, record in host.state.items()
                        if name.startswith(prefix)})
    node_config = {**host.node_config, "partition-id": partition_id,
                   "num-partitions": num_partitions}
    return Context(run_id=host.run_id, node_id=host.node_id, node_config=node_config,
                   state=state, run_config=host.run_config)


def keep_client_state(host: Context, client: HostedClient) -> None:
    """Write the client's ``Context.state`` back under its prefix of the host's."""
    prefix = f"{STATE_PREFIX}{client.partition_id}/"
    for name in [n for n in host.state.keys() if n.startswith(prefix)]:
        del host.state[name]
    for name, record in client.context.state.items():
        host.state[prefix + name] = record


def failure(message: Message, error: Exception) -> Message:
    """The error reply a client that raised gets (what Flower gives a ClientApp that raised,
    without the traceback on the console: the server logs the reason)."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"{type(error).__name__}: {error}"), reply_to=message)


def guarded(handler: Callable[[Message, Context], Message], client: HostedClient) -> Message:
    """``handler``'s reply to the client, or its error reply if it raised."""
    try:
        return handler(client.message, client.context)
    except Exception as error:  # one client's failure is its own: the others go on
        return failure(client.message, error)


def hosted_clients(message: Message, context: Context) -> tuple[list[HostedClient], int]:
    """The clients of a packed message, in the order the server listed them, and the
    ``client-batch`` it asks for."""
    hosted = message.content[HOSTED]
    num_partitions = int(hosted["num-partitions"])
    contents = unpack(message.content)
    clients = [HostedClient(int(pid), Message(metadata=message.metadata, content=contents[int(pid)]),
                            client_context(context, int(pid), num_partitions))
               for pid in hosted["partition-ids"]]
    return clients, int(hosted.get("client-batch", 1))


def serve_hosted(message: Message, context: Context,
                 handler: Callable[[Message, Context], Message],
                 together: Callable[[list[HostedClient], int], dict[int, Message]] | None = None
                 ) -> Message:
    """The host's reply to a packed message: ``handler`` serves each client one after another,
    or ``together(clients, client_batch)`` serves them all (batched training) and returns
    each one's reply by partition id. Each client's state goes back into the host's."""
    clients, client_batch = hosted_clients(message, context)
    if together is None or client_batch <= 1:
        replies = {client.partition_id: guarded(handler, client) for client in clients}
    else:
        replies = together(clients, client_batch)
    contents = {}
    for client in clients:
        keep_client_state(context, client)
        reply = replies[client.partition_id]
        if reply.has_error():
            contents[client.partition_id] = RecordDict(
                {"error": error_record(reply.error.code, reply.error.reason)})
        else:
            contents[client.partition_id] = reply.content
    return Message(content=pack(contents), reply_to=message)
