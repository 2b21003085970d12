"""What a node's reply must hold before the server lets it touch anything: one schema for the
three kinds of reply a run receives.

* a training round's update (``FederatedLoRA.aggregate_train``) and a method's one-time set-up
  reply (``initialize``, e.g. Fed-SB's summed gradients): ``ReplySchema.problem``;
* a node's ``query.describe`` answer (``fedlora.run.server``): ``describe_problem``.

Every check returns why the reply must be dropped (one line: it is logged and recorded in
``results.jsonl``'s ``rejected``) or None. A dropped reply counts as a failure of that node;
the round and the run go on without it, and nothing it holds reaches the global state, the
node bookkeeping or the DP ledger (``fedlora.privacy.accounting.accountant_problem`` is the
ledger's own half of this schema: it never keeps a malformed accountant).

An update or set-up reply must be (``ReplySchema``):
  1. a reply, not an error, from a node of the run, with an ``arrays`` and a ``metrics`` record
     (a ``partition-id`` metric, if any, naming the sender's own partition);
  2. metrics that are all finite numbers (or lists of them);
  3. ``num-examples`` a positive integer, not above the number of examples the node described
     (so no node can weigh more than its data: ``c_k = n_k / sum n``);
  4. under record-level DP, a well-formed accountant (``accountant_problem``);
  5. exactly the tensors sent for (keys), each of the shape and dtype expected and finite;
  6. an update whose change of the global state, ``||x_k - x||_2`` over its trained tensors
     jointly, is at most ``max_update_norm``. The change rather than ``||x_k||``: the change is
     what moves the state (``x <- x + eta sum_k c_k (x_k - x)``), so one bound caps one reply's
     pull whatever the scale of the state itself (LoRA-SB's R, a trained head), and a
     generous default leaves every honest run alone while a node sending 1e300 is dropped
     before it can overflow the state to Inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from fedlora.privacy.accounting import accountant_problem

# key -> (shape, dtype); dtype None: any floating-point dtype
TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype | None]]


def tensor_spec(tensors: dict[str, torch.Tensor]) -> TensorSpec:
    """The spec of replies that send back ``tensors``' keys, shapes and dtypes."""
    return {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_problem(metrics) -> str | None:
    """Why ``metrics`` hold a value that is not a finite number or a list of them, or None."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            return f"metric '{key}' is not a finite number"
    return None


def count_problem(metrics, key: str, most: int | None = None) -> str | None:
    """Why ``metrics[key]`` is not a positive integer (at most ``most``), or None."""
    if key not in metrics:
        return f"reply lacks '{key}'"
    value = metrics[key]
    if not _finite_number(value) or value != int(value) or value <= 0:
        return f"'{key}' is {value!r}, not a positive integer"
    if most is not None and value > most:
        return f"'{key}' is {int(value)}, more than the {most} examples the node described"
    return None


def tensors_problem(update: dict[str, torch.Tensor], spec: TensorSpec) -> str | None:
    """Why ``update`` does not hold exactly ``spec``'s keys, each of its shape and dtype (a
    floating one where the spec names none) and finite, or None."""
    if set(update) != set(spec):
        extra, missing = sorted(set(update) - set(spec)), sorted(set(spec) - set(update))
        return f"keys differ from the expected tensors (extra {extra[:3]}, missing {missing[:3]})"
    for key, tensor in update.items():
        shape, dtype = spec[key]
        if tuple(tensor.shape) != shape or (tensor.dtype != dtype if dtype is not None
                                            else not tensor.is_floating_point()):
            return (f"'{key}' has shape {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{shape} {dtype if dtype is not None else 'floating point'}")
        if not torch.isfinite(tensor).all():
            return f"'{key}' has NaN or Inf values"
    return None


def change_norm(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """``||update - reference||_2`` over all of ``update``'s tensors jointly (float64)."""
    return math.sqrt(sum(float((t.double() - reference[k].double()).pow(2).sum())
                         for k, t in update.items()))


@dataclass(frozen=True)
class ReplySchema:
    """What one kind of update or set-up reply must hold (the module's steps 1 to 6).

    ``tensors``: the arrays expected back; ``examples``: each partition's size as its node
    described it (a partition not in it: no bound); ``accountant``: replies carry their DP
    accountant (record-level DP); ``reference``: the values an update changes (the global
    state sent), whose distance ``max_update_norm`` bounds (None: no bound, e.g. gradients)."""

    tensors: TensorSpec
    examples: dict[int, int] = field(default_factory=dict)
    accountant: bool = False
    reference: dict[str, torch.Tensor] | None = None
    max_update_norm: float = math.inf

    def problem(self, message: Message, partition_of: dict[int, int]) -> str | None:
        """Why ``message`` must be dropped, or None if the server may use it."""
        if message.has_error():
            return f"client error: {message.error.reason}"
        content = message.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks 'arrays' or 'metrics'"
        node = message.metadata.src_node_id
        if node not in partition_of:
            return f"reply from unknown node {node}"
        metrics = content["metrics"]
        problem = metrics_problem(metrics)
        if problem:
            return problem
        partition = partition_of[node]
        if "partition-id" in metrics and metrics["partition-id"] != partition:
            return f"reply names partition {metrics['partition-id']!r}, the node holds {partition}"
        problem = count_problem(metrics, "num-examples", self.examples.get(partition))
        if problem:
            return problem
        if self.accountant:
            problem = accountant_problem(metrics)
            if problem:
                return f"DP accountant: {problem}"
        try:
            update = content["arrays"].to_torch_state_dict()
        except Exception as error:  # a node's bytes: whatever they fail with is its problem
            return f"arrays cannot be read: {type(error).__name__}: {error}"
        problem = tensors_problem(update, self.tensors)
        if problem:
            return problem
        if self.reference is not None:
            norm = change_norm(update, self.reference)
            if not norm <= self.max_update_norm:
                return (f"update changes the global state by {norm:.3g} (L2), above "
                        f"max_update_norm={self.max_update_norm:g}")
        return None


def describe_problem(message: Message, clients: int, num_labels: int | None = None) -> str | None:
    """Why a ``query.describe`` answer cannot be used, or None: an error, no metrics, a
    ``partition-id`` that is not an integer in 0..clients-1, ``num-examples`` not a positive
    integer, or a ``label-histogram`` (optional: DP clients send none) that is not
    ``num_labels`` integer counts >= 0 summing to ``num-examples``."""
    if message.has_error():
        return f"client error: {message.error.reason}"
    if "metrics" not in message.content.metric_records:
        return "reply lacks 'metrics'"
    metrics = message.content["metrics"]
    problem = metrics_problem(metrics)
    if problem:
        return problem
    partition = metrics.get("partition-id")
    if not (_finite_number(partition) and partition == int(partition) and 0 <= partition < clients):
        return (f"'partition-id' is {partition!r}, not an integer in 0..{clients - 1} (start node "
                f"i with --node-config 'partition-id=i num-partitions={clients}')")
    problem = count_problem(metrics, "num-examples")
    if problem:
        return problem
    if "label-histogram" in metrics:
        histogram = metrics["label-histogram"]
        if (not isinstance(histogram, list) or any(v != int(v) or v < 0 for v in histogram)
                or (num_labels is not None and len(histogram) != num_labels)
                or sum(histogram) != metrics["num-examples"]):
            counts = "counts" if num_labels is None else f"{num_labels} counts"
            return (f"'label-histogram' is not {counts} >= 0 summing to "
                    f"num-examples={int(metrics['num-examples'])}")
    return None
