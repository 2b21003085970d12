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

Handlers (message types):
  query.describe     partition id, number of examples and (without DP) label histogram of
                     this node
  train              local steps on the parts named in ``trained-parts``; reply with them
  train.setup        a method's one-time set-up step (``ClientHooks.setup``)
"""

from __future__ import annotations

import dataclasses
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
from fedlora.clients.dp import ClientPrivacy, poisson_batches
from fedlora.clients.hooks import ClientHooks
from fedlora.clients.train import client_update
from fedlora.core.registry import get_method

app = ClientApp()
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


@lru_cache(maxsize=2)
def _tokenised_train(model_spec, task, max_length: int, device: str) -> ExampleBatches:
    """The task's tokenised training split, once per process (all partitions index into it)."""
    return task.training_examples(models.cached_model(model_spec, device).tokenizer, max_length)


def _parts(config: ConfigRecord, key: str) -> set[str]:
    return {p for p in str(config.get(key, "")).split(",") if p}


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    setup = ClientSetup(message, context)
    metrics = {"partition-id": setup.partition_id, "num-examples": len(setup.indices)}
    if float(setup.config.get("dp-epsilon", 0.0)) <= 0:  # under DP: nothing unaccounted
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
    setup = ClientSetup(message, context)
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
    bundle.load(full_adapter_state(received, kept, initial, bundle.shapes()))
    trained = _parts(cfg, "trained-parts")
    trainable = bundle.set_trainable(trained)
    local_steps = int(cfg["local-steps"])
    privacy = ClientPrivacy.for_node(cfg, context.state, len(setup.indices))
    if privacy is None:
        steps = setup.batches.sample_steps(setup.indices, int(cfg["batch-size"]), local_steps,
                                           setup.rng)
    elif not privacy.can_afford(local_steps):  # out of budget: decline, do not touch the data
        return setup.reply(message, {}, {"dp-declined": 1, **privacy.metrics()})
    else:
        steps = poisson_batches(setup.batches, setup.indices, privacy.sample_rate, local_steps,
                                privacy.rng("poisson", setup, context.state))
        privacy.noise_generator = privacy.rng("noise", setup, context.state, setup.device)
    head = [param for key, param in bundle.model.named_parameters()
            if param.requires_grad and key in bundle.head_keys]
    metrics = client_update(bundle.model, trainable, steps, float(cfg["lr"]), setup.device,
                            privacy, loss=setup.hooks.training_loss(setup, setup.task.loss),
                            optimizer=str(cfg["optimizer"]), head=head,
                            head_lr=float(cfg["head-lr"]))
    if privacy is not None:  # the un-noised loss and step count stay on the node
        privacy.spend(local_steps, context.state, "train", int(cfg["server-round"]))
        metrics = privacy.metrics()
    metrics = setup.hooks.after_training(setup, context, metrics)
    return setup.reply(message, bundle.state(trained), metrics)


@app.train("setup")  # SETUP_MESSAGE_TYPE
def setup(message: Message, context: Context) -> Message:
    """A method's one-time set-up step: its client hooks' ``setup`` answers it."""
    node = ClientSetup(message, context)
    arrays, metrics = node.hooks.setup(node, message, context)
    return node.reply(message, arrays, metrics)
