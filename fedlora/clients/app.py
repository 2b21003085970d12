"""fedlora's ClientApp: the same app in simulation (Ray) and deployment (SuperNodes).

It has no config of its own: every message carries the model, data and training settings in
its ConfigRecord. The pretrained model is built once per process and kept
(``fedlora.model.pretrained.cached_model``); each message loads the full adapter state it needs into it,
so virtual clients sharing a Ray worker never see each other's tensors. That state is, key by
key, what the server sent, else what the node kept from an earlier round (``keep-parts``,
in ``Context.state``), else the shared-seed init (``seeded-parts``), at the client's own rank
(``client-rank``, clients of different ranks: the cached model's adapters are resized, and a
seeded factor is the first ``client-rank`` rows / columns of the seed's). The app names no method:
what a method's clients do beyond this (a set-up step, node state of their own such as a base
delta added to the pretrained W0) is its client hooks' (``fedlora.clients.hooks``), looked up
by the ``strategy`` of each message's config.

A message may also carry a ``restore`` record: what a node lost when the server restarted (its
kept parts, which take the place of the ``arrays`` ones, and the method's own node state,
which its hooks take back).
``crash-prob`` > 0 makes a training round fail on purpose (``faults.crash_prob``): the
client answers with an error reply instead of training.
Before any of that, each handler checks the run's settings against the node's own DP policy
(``fedlora.clients.policy``, from ``Context.node_config``): a run below it gets one error reply
that names the key, and nothing else.

Handlers (message types):
  query.describe     partition id, number of examples and (without DP, in either mode)
                     label histogram of this node
  train              local steps on the parts named in ``trained-parts``; reply with them
  train.setup        a method's one-time set-up step (``ClientHooks.setup``)

Each handler also serves a host node's packed message (simulation with ``client_hosts`` or
``client_batch``; ``fedlora.clients.host``): every client of it with a Context of its own, as
if it were a node of its own; ``train`` trains up to ``client_batch`` of them together
(``fedlora.clients.batched``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedlora.model import pretrained as models
from fedlora.model.adapters import part_of, state_at_rank
from fedlora.report.comm import RESTORE, STATE_LOST
from fedlora.config import (partition_from_client_config, specs_from_client_config,
                            task_from_client_config)
from fedlora.tasks.data import ExampleBatches, client_partitions
from fedlora.privacy.randomness import client_seed
from fedlora.clients.batched import ClientSteps, RandomStream, train_together
from fedlora.clients.dp import ClientPrivacy, ReleaseRefused, poisson_batches
from fedlora.clients.host import HostedClient, failure, guarded, is_hosted, serve_hosted
from fedlora.clients.policy import refusal
from fedlora.clients.hooks import ClientHooks
from fedlora.clients.train import client_update
from fedlora.core.registry import get_method

app = ClientApp()
log = logging.getLogger("fedlora")
NODE_MARK = "fedlora-node"  # a ConfigRecord in Context.state: this node has trained in this run


class ClientSetup:
    """This node's model, data and settings for one message."""

    def __init__(self, message: Message, context: Context):
        self.config = message.content["config"]
        cfg = self.config
        torch.set_num_threads(max(1, int(cfg["client-cpus"])))
        self.device = str(cfg["device"])
        self.model_spec, self.data_spec = specs_from_client_config(cfg)
        local_path = context.node_config.get("data.path")
        if local_path:  # a SuperNode's own copy of the data: --node-config 'data.path="..."'
            self.data_spec = dataclasses.replace(self.data_spec, path=str(local_path), name=None)
        self.task = task_from_client_config(cfg, self.data_spec)  # the message's ``task``
        method = get_method(str(cfg["strategy"]))
        self.hooks: ClientHooks = (method.client or ClientHooks)()
        self.bundle = models.cached_model(self.model_spec, self.device)
        self.batches = _tokenised_train(self.model_spec, self.task, int(cfg["max-length"]),
                                        self.device)
        self.partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        partitions = client_partitions(self.task, num_partitions,
                                       partition_from_client_config(cfg), int(cfg["seed"]))
        self.indices = partitions[self.partition_id]
        server_round = int(cfg.get("server-round", 0))
        # One seed per (run, round, client): the batches and dropout masks are reproducible
        # (DP's samples and noise come from ``ClientPrivacy.rng``: secret unless reproducible).
        self.seed = client_seed(int(cfg["seed"]), server_round, self.partition_id)
        self.rng = random.Random(self.seed)
        torch.manual_seed(self.seed)

    def reply(self, message: Message, arrays: dict[str, torch.Tensor], metrics: dict) -> Message:
        # num-examples: the examples the reply stands for (a hook may report a sample's)
        metrics = {**metrics, "num-examples": metrics.get("num-examples", len(self.indices)),
                   "partition-id": self.partition_id,
                   "pid": os.getpid(), "model-builds": models.BUILD_COUNT}
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=message)


def refused(setup: ClientSetup, message: Message, context: Context) -> Message | None:
    """The error reply to a message whose run this node's DP policy refuses (its reason names
    the policy key and the run's value; no metric, no tensor), or None: the node serves it."""
    reason = refusal(context.node_config, setup.config, len(setup.indices))
    if reason is None:
        return None
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"{reason} (partition {setup.partition_id})"), reply_to=message)


@lru_cache(maxsize=2)
def _tokenised_train(model_spec, task, max_length: int, device: str) -> ExampleBatches:
    """The task's tokenised training split, once per process (all partitions index into it)."""
    return task.training_examples(models.cached_model(model_spec, device).tokenizer, max_length)


def _parts(config: ConfigRecord, key: str) -> set[str]:
    return {p for p in str(config.get(key, "")).split(",") if p}


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    if is_hosted(message):
        return serve_hosted(message, context, describe)
    setup = ClientSetup(message, context)
    refusal_reply = refused(setup, message, context)
    if refusal_reply is not None:  # e.g. a run without DP: no label histogram either
        return refusal_reply
    metrics = {"partition-id": setup.partition_id, "num-examples": len(setup.indices)}
    if "dp-mode" not in setup.config:  # under DP, record- or client-level: nothing unaccounted
        labels = setup.batches.labels[list(setup.indices)]
        metrics["label-histogram"] = torch.bincount(
            labels, minlength=setup.model_spec.num_labels).tolist()
    content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def check_state_kept(config: ConfigRecord, has_state: bool) -> None:
    """Fail with ``STATE_LOST`` if the server expects this node to hold state from earlier
    rounds (``expect-state``: it has trained before, and the method keeps parts or a base
    delta) but its Context.state is empty: a SuperNode restarted under the same node id (node
    authentication). Training on would silently use the wrong factors (e.g. a seeded A_0)."""
    if int(config.get("expect-state", 0)) and not has_state:
        raise RuntimeError(f"{STATE_LOST}: the server expects this node to hold what it kept "
                           "from earlier rounds but its Context.state is empty (restarted?); the "
                           "server restores it with the next message")


def full_adapter_state(received: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                       seeded: dict[str, torch.Tensor], expected_keys) -> dict[str, torch.Tensor]:
    """Every adapter/head tensor the model needs: sent, else kept, else from the init seed."""
    state = {**seeded, **kept, **received}
    missing = set(expected_keys) - set(state)
    if missing:  # a shared cached model must never train on another client's leftovers
        raise RuntimeError(f"the node has no value for {sorted(missing)[:3]} (and more): the "
                           "server sent none, and it neither kept nor seeds it")
    return state


def simulated_crash(seed: int, server_round: int, partition_id: int, crash_prob: float) -> bool:
    """Whether this client fails this round: a draw of its own (seed, round, partition) stream,
    so the same clients fail in every run with the same seed, whichever worker runs them."""
    return crash_prob > 0 and random.Random(f"crash/{seed}/{server_round}/{partition_id}").random() < crash_prob


@app.train()
def train(message: Message, context: Context) -> Message:
    if is_hosted(message):  # several clients of a host node (client_hosts, client_batch)
        return serve_hosted(message, context, train, together=train_hosted_clients)
    local = begin_training(message, context)
    return local if isinstance(local, Message) else train_alone(local)


@dataclasses.dataclass
class LocalRound:
    """A client's training round once its state is assembled, before its local steps: what
    ``train_alone`` runs, or ``fedlora.clients.batched`` together with other clients'."""

    setup: ClientSetup
    message: Message
    context: Context
    start: dict[str, torch.Tensor]  # the full adapter and head state it trains from
    trained: set[str]
    steps: list  # example indices of each local step (under DP its Poisson samples; None: empty)
    privacy: ClientPrivacy | None
    rank: int  # the adapter rank it trains at (``client-rank``; else the build's)


def begin_training(message: Message, context: Context) -> LocalRound | Message:
    """A train message up to its local steps (the node's state assembled and kept, its hooks
    run, its batches drawn), or the reply that ends it first (a simulated crash, a DP client
    out of budget)."""
    setup = ClientSetup(message, context)
    refusal_reply = refused(setup, message, context)
    if refusal_reply is not None:
        return refusal_reply
    cfg, bundle = setup.config, setup.bundle
    crash_prob = float(cfg.get("crash-prob", 0.0))
    if simulated_crash(int(cfg["seed"]), int(cfg["server-round"]), setup.partition_id, crash_prob):
        # The error reply a crashed ClientApp gives, without Ray's traceback on the console.
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"simulated crash of partition {setup.partition_id} in round "
                                    f"{cfg['server-round']} (faults.crash_prob={crash_prob})"),
                       reply_to=message)
    check_state_kept(cfg, NODE_MARK in context.state.config_records)
    context.state[NODE_MARK] = ConfigRecord({"server-round": int(cfg["server-round"])})
    rank = int(cfg.get("client-rank", 0)) or setup.model_spec.rank
    bundle.set_rank(rank)  # the build's rank unless the server gives this client its own
    received = message.content["arrays"].to_torch_state_dict()
    restore = (message.content[RESTORE].to_torch_state_dict()
               if RESTORE in message.content.array_records else {})
    received.update(setup.hooks.restore(setup, context, restore))
    received = setup.hooks.before_training(setup, context, received)
    keep, seeded = _parts(cfg, "keep-parts"), _parts(cfg, "seeded-parts")
    kept = context.state["kept"].to_torch_state_dict() if "kept" in context.state.array_records else {}
    delivered = {k: v for k, v in received.items() if part_of(k, bundle.head_keys) in keep}
    if delivered:  # the latest value of the tensors this node keeps
        kept = {**kept, **delivered}
        context.state["kept"] = ArrayRecord(kept)
    initial = state_at_rank({k: v for k, v in bundle.initial_state.items()
                             if part_of(k, bundle.head_keys) in seeded}, rank)
    start = full_adapter_state(received, kept, initial, bundle.shapes())
    local_steps = int(cfg["local-steps"])
    privacy = ClientPrivacy.for_node(cfg, context.state, len(setup.indices))
    if privacy is None:  # the indices of the batches ``sample_steps`` draws
        steps = list(example_indices(setup.batches).sample_steps(
            setup.indices, int(cfg["batch-size"]), local_steps, setup.rng))
    elif not privacy.can_afford(local_steps):  # out of budget: decline, do not touch the data
        return setup.reply(message, {}, {"dp-declined": 1, **privacy.metrics()})
    else:
        steps = list(poisson_batches(example_indices(setup.batches), setup.indices,
                                     privacy.sample_rate, local_steps,
                                     privacy.rng("poisson", setup, context.state)))
        privacy.noise_generator = privacy.rng("noise", setup, context.state, setup.device)
    return LocalRound(setup, message, context, start, _parts(cfg, "trained-parts"), steps, privacy,
                      rank)


def example_indices(batches: ExampleBatches) -> ExampleBatches:
    """``batches`` whose batches are the lists of example indices it would collate: its own
    sampling (``epoch``, ``sample_steps``), drawing the same random numbers."""
    view = copy.copy(batches)
    view.collate = list
    return view


def train_alone(local: LocalRound) -> Message:
    """The client's local steps on the shared model (``client_update``), and its reply."""
    setup, cfg, bundle = local.setup, local.setup.config, local.setup.bundle
    bundle.set_rank(local.rank)
    bundle.load(local.start)
    trainable = bundle.set_trainable(local.trained)
    steps = (None if indices is None else setup.batches.collate(indices)
             for indices in local.steps)  # None: an empty Poisson batch (DP)
    head = [param for key, param in bundle.model.named_parameters()
            if param.requires_grad and key in bundle.head_keys]
    metrics = client_update(bundle.model, trainable, steps, float(cfg["lr"]), setup.device,
                            local.privacy, loss=setup.hooks.training_loss(setup, setup.task.loss),
                            optimizer=str(cfg["optimizer"]), head=head, head_lr=float(cfg["head-lr"]))
    return finish_training(local, bundle.state(local.trained), metrics)


def finish_training(local: LocalRound, trained: dict[str, torch.Tensor], metrics: dict) -> Message:
    """The reply with the client's trained tensors; under DP its steps are charged first, and
    it reports its accountant instead of the un-noised loss and step count (they stay on the
    node)."""
    cfg = local.setup.config
    if local.privacy is not None:
        local.privacy.spend(int(cfg["local-steps"]), local.context.state, "train",
                            int(cfg["server-round"]))
        metrics = local.privacy.metrics()
    metrics = local.setup.hooks.after_training(local.setup, local.context, metrics)
    return local.setup.reply(local.message, trained, metrics)


@dataclasses.dataclass
class ReadyClient:
    """A hosted client ready for its local steps: its round, the base weights its hooks set
    (None: pretrained) and the torch RNG state where its steps would begin alone."""

    client: HostedClient
    local: LocalRound
    base: dict[str, torch.Tensor] | None
    stream: RandomStream

    def settings(self) -> tuple:
        """What clients trained in one pass must share (besides the base weights)."""
        setup, cfg = self.local.setup, self.local.setup.config
        return (self.local.rank, tuple(sorted(self.local.trained)), str(cfg["optimizer"]), float(cfg["lr"]),
                float(cfg["head-lr"]), len(self.local.steps), setup.device, id(setup.bundle),
                id(setup.batches), setup.task, self.local.privacy is None)


def train_hosted_clients(clients: list[HostedClient], client_batch: int) -> dict[int, Message]:
    """A host's clients of one round, trained up to ``client_batch`` at a time in one pass
    (``fedlora.clients.batched``): clients with the same training settings and base weights
    are split into as few chunks as ``client_batch`` allows, of sizes that differ by at most
    one. A client that fails before its steps gets its own error reply; if a chunk fails, each
    of its clients is trained again alone, so no client fails because of another's data. DP
    clients train together too, each with its own per-example clipping, noise and accountant
    (``fedlora.clients.batched.private_step``). A client whose hooks add to its loss trains
    alone; clients of different ranks (``client_ranks``) train in different chunks."""
    replies: dict[int, Message] = {}
    groups: dict[tuple, list[list[ReadyClient]]] = {}
    for client in clients:
        try:
            local = begin_training(client.message, client.context)
        except Exception as error:  # the client's own failure
            replies[client.partition_id] = failure(client.message, error)
            continue
        if isinstance(local, Message):
            replies[client.partition_id] = local
            continue
        setup = local.setup
        if setup.hooks.training_loss(setup, setup.task.loss) is not setup.task.loss:
            # its hooks add a term of its own to the loss (HetLoRA's pruning): trained alone,
            # now, while the shared model holds what its hooks set
            replies[client.partition_id] = guarded(lambda _m, _c, local=local: train_alone(local),
                                                   client)
            continue
        ready = ReadyClient(client, local, base_weights(local.setup.bundle),
                            RandomStream.capture(local.setup.device))
        same = groups.setdefault(ready.settings(), [])
        group = next((g for g in same if same_base(g[0].base, ready.base)), None)
        if group is None:
            same.append([ready])
        else:
            group.append(ready)
    for group in (g for same in groups.values() for g in same):
        for chunk in balanced_chunks(group, client_batch):
            try:
                replies.update(train_chunk(chunk))
            except Exception as error:  # retried client by client: a failure is then one client's
                log.warning("%d clients trained together failed (%s: %s): each is trained alone",
                            len(chunk), type(error).__name__, error)
                for ready in chunk:
                    replies[ready.client.partition_id] = guarded(train, ready.client)
    return replies


def base_weights(bundle: models.AdaptedModel) -> dict[str, torch.Tensor] | None:
    """The adapted layers' base weights as a client's hooks set them; None: pretrained."""
    if bundle.base_is_pretrained:
        return None
    return {name: bundle.model.get_submodule(name).base.weight.detach().clone()
            for name in bundle.adapted}


def same_base(first: dict | None, second: dict | None) -> bool:
    if first is None or second is None:
        return first is second
    return all(torch.equal(first[name], second[name]) for name in first)


def balanced_chunks(items: list, size: int) -> list[list]:
    """``items`` in as few consecutive chunks of at most ``size`` as possible, their sizes
    differing by at most one (8 at size 5: 4 + 4, not 5 + 3)."""
    count = -(-len(items) // size)
    small, extra = divmod(len(items), count)
    chunks, first = [], 0
    for index in range(count):
        length = small + (index < extra)
        chunks.append(items[first:first + length])
        first += length
    return chunks


def train_chunk(chunk: list[ReadyClient]) -> dict[int, Message]:
    """One pass per step for the chunk's clients, on the base weights they share; each one's
    reply."""
    first = chunk[0].local
    setup, cfg, bundle = first.setup, first.setup.config, first.setup.bundle
    if chunk[0].base is None:
        bundle.set_base_delta(None)
    else:  # FedEx: W0 plus the delta every client of the chunk holds
        with torch.no_grad():
            for name, weight in chunk[0].base.items():
                bundle.model.get_submodule(name).base.weight.copy_(weight)
        bundle.base_is_pretrained = False
    bundle.set_rank(first.rank)  # clients of different ranks are in different chunks
    trained_keys = [key for key in bundle.shapes() if part_of(key, bundle.head_keys) in first.trained]
    steps = [ClientSteps(ready.local.start, ready.local.steps, float(cfg["lr"]),
                         float(cfg["head-lr"]), ready.stream, privacy=ready.local.privacy)
             for ready in chunk]
    states = train_together(bundle.model, bundle.head_keys, trained_keys, steps, setup.batches,
                            setup.task.loss, str(cfg["optimizer"]), setup.device)
    return {ready.client.partition_id: finish_training(ready.local, state, {
                "train_loss": sum(s.losses) / max(len(s.losses), 1), "steps": len(s.losses)})
            for ready, state, s in zip(chunk, states, steps)}


@app.train("setup")  # SETUP_MESSAGE_TYPE
def setup(message: Message, context: Context) -> Message:
    """A method's one-time set-up step: its client hooks' ``setup`` answers it (a DP release
    the node refuses, e.g. a second one in the run: an error reply naming why)."""
    if is_hosted(message):
        return serve_hosted(message, context, setup)
    node = ClientSetup(message, context)
    refusal_reply = refused(node, message, context)
    if refusal_reply is not None:
        return refusal_reply
    try:
        arrays, metrics = node.hooks.setup(node, message, context)
    except ReleaseRefused as declined:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(declined)),
                       reply_to=message)
    return node.reply(message, arrays, metrics)
