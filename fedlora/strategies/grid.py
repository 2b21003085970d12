"""What a strategy asks of Flower's grid before round 1: the run's nodes and a set-up exchange.

fedlora samples by partition (a seeded draw over partition ids, so a run is the same whatever
node ids Flower hands out), so before round 1 it waits until every node is connected (Flower
registers them over the first seconds; sampling earlier would see only some) and asks each
for its partition id, number of examples and label histogram (``query.describe``, answered by
fedlora's ClientApp). Both fedlora's round loop (``fedlora.run.server``) and a strategy started
in any Flower ServerApp (``FederatedLoRA.start``) use these.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.clients.policy import NODE_POLICY
from fedlora.core.errors import ConfigError
from fedlora.strategies.replies import describe_problem

log = logging.getLogger("fedlora")

REPLY_TIMEOUT_S = 3600.0


def wait_for_nodes(grid, count: int, timeout_s: float = 300.0) -> list[int]:
    """Block until ``count`` nodes are connected, so round 1 samples from all of them."""
    deadline = time.time() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} clients connected in {timeout_s:.0f} s")
        time.sleep(0.2)


def describe_nodes(grid, nodes: list[int], config: dict, clients: int) -> dict[int, dict]:
    """Each node's partition id, number of examples and label histogram (None from a DP
    client, which does not send it). A node whose answer is an error or fails the reply schema
    (``fedlora.strategies.replies.describe_problem``: a partition id outside 0..clients-1, a
    count that is not a positive integer, a malformed histogram) is logged and left out. A node
    whose own DP policy refuses the run (``fedlora.clients.policy``) stops it, once every node
    has answered: a one-line ``ConfigError`` naming the key."""
    messages = [Message(content=RecordDict({"config": ConfigRecord(config)}),
                        message_type="query.describe", dst_node_id=node) for node in nodes]
    info, refusals = {}, []
    for reply in grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S):
        if reply.has_error() and NODE_POLICY in reply.error.reason:
            refusals.append(reply.error.reason)
            continue
        problem = describe_problem(reply, clients, config.get("num-labels"))
        if problem:
            log.warning("node %s did not describe itself (it is left out): %s",
                        reply.metadata.src_node_id, problem)
            continue
        metrics = reply.content["metrics"]
        info[reply.metadata.src_node_id] = {"partition_id": int(metrics["partition-id"]),
                                            "num_examples": int(metrics["num-examples"]),
                                            "label_histogram": list(metrics["label-histogram"])
                                            if "label-histogram" in metrics else None}
    if refusals:  # a node's own DP policy refuses the run's settings: nothing to run
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise ConfigError(f"{len(refusals)} of {len(messages)} nodes refuse the run: "
                          f"{sorted(refusals)[0]}{more}")
    return info


class GridExchange:
    """Sends a set-up round's messages (``FederatedLoRA.initialize``) through the grid and
    returns the replies; ``client_config``: what fedlora's ClientApp reads from every message.
    fedlora's round loop uses ``fedlora.run.server.Exchange``, which also counts the bytes."""

    def __init__(self, grid, client_config: dict, timeout: float = REPLY_TIMEOUT_S):
        self.grid = grid
        self.client_config = client_config
        self.timeout = timeout

    def __call__(self, server_round: int, messages: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.timeout))
