"""fedlora's ClientApp: the same app in simulation (Ray) and deployment (SuperNodes).

It has no config of its own: every message carries the model, data and training settings in
its ConfigRecord. The pretrained model is built once per process and kept
(``fedlora.models.cached_model``); each message loads the full adapter state it needs into it,
so virtual clients sharing a Ray worker never see each other's tensors. That state is, key by
key, what the server sent, else what the node kept from an earlier round (``keep-parts``:
Fed-SB's B and A, FedSVD's latest A, in ``Context.state``), else the shared-seed init
(``seeded-parts``: FFA-LoRA's and FedSVD's A_0). FedEx-LoRA's residuals are added to the base
delta the node keeps in ``Context.state``, and every adapted base weight is set to the
pretrained W0 plus this node's delta before training (W0 for the other methods).

A message may also carry a ``restore`` record: what a node lost when the server restarted (its
kept parts, which take the place of the ``arrays`` ones; FedEx-LoRA's base delta as it held
it, with ``restore-base-held`` rounds, to which the message's residuals are then added).
``crash-prob`` > 0 makes a training round fail on purpose (``faults.crash_prob``): the
client answers with an error reply instead of training.

Handlers (message types):
  query.describe     partition id, number of examples and label histogram of this node
  train              local steps on the parts named in ``trained-parts``; reply with them
  train.fedsb_init   the summed base-weight gradients for LoRA-SB's initialisation
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

from fedlora import models
from fedlora.adapters import part_of, split_residual_key
from fedlora.comm import RESTORE, STATE_LOST
from fedlora.config import partition_from_client_config, specs_from_client_config
from fedlora.data import Batches, client_partitions, load_dataset
from fedlora.clients.dp import ClientPrivacy, poisson_batches, private_gradient_sum
from fedlora.clients.train import base_gradient_sum, client_update

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
        self.bundle = models.cached_model(self.model_spec, self.device)
        self.batches = _tokenised_train(self.model_spec, self.data_spec, int(cfg["max-length"]),
                                        self.device)
        self.partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        partitions = client_partitions(self.data_spec, num_partitions,
                                       partition_from_client_config(cfg), int(cfg["seed"]))
        self.indices = partitions[self.partition_id]
        server_round = int(cfg.get("server-round", 0))
        # One seed per (run, round, client): the batches and dropout masks are reproducible.
        self.seed = (int(cfg["seed"]) * 1_000_003 + server_round) * 1_000_003 + self.partition_id
        self.rng = random.Random(self.seed)
        torch.manual_seed(self.seed)

    def reply(self, message: Message, arrays: dict[str, torch.Tensor], metrics: dict) -> Message:
        metrics = {**metrics, "num-examples": len(self.indices), "partition-id": self.partition_id,
                   "pid": os.getpid(), "model-builds": models.BUILD_COUNT}
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=message)


@lru_cache(maxsize=2)
def _tokenised_train(model_spec, data_spec, max_length: int, device: str) -> Batches:
    """The tokenised training split, once per process (all partitions index into it)."""
    train = load_dataset(data_spec).train
    tokenizer = models.cached_model(model_spec, device).tokenizer
    return Batches(tokenizer, train.texts, train.labels, max_length)


def _parts(config: ConfigRecord, key: str) -> set[str]:
    return {p for p in str(config.get(key, "")).split(",") if p}


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    setup = ClientSetup(message, context)
    labels = setup.batches.labels[list(setup.indices)]
    histogram = torch.bincount(labels, minlength=setup.model_spec.num_labels).tolist()
    content = RecordDict({"metrics": MetricRecord({"partition-id": setup.partition_id,
                                                   "num-examples": len(setup.indices),
                                                   "label-histogram": histogram})})
    return Message(content=content, reply_to=message)


def residual_increments(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FedEx-LoRA's base-weight increment per layer from a message's residual tensors: the
    dense sum as sent, or the product of the stacked factors ``B_stack @ A_stack``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays.items():
        layer, factor = split_residual_key(key)
        parts.setdefault(layer, {})[factor] = tensor
    return {layer: f[""] if "" in f else f["_B"] @ f["_A"] for layer, f in parts.items()}


def update_base_delta(delta: dict[str, torch.Tensor], held: int, start: int, end: int,
                      residuals: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A node's base delta after the residual rounds ``start..end`` the server sent, given
    that it has added ``held`` rounds so far. Returns ``(delta, rounds held)``.

    ``start = 0`` is every residual so far: the delta starts afresh (the server resends all
    after a lost reply, not knowing whether the node added the last ones)."""
    if end == held:  # nothing new (or already added before a lost reply)
        return delta, held
    if start == 0:
        delta = {}
    elif held != start:
        raise RuntimeError(f"the node holds the residuals of {held} rounds but the server sent "
                           f"rounds {start}..{end}")
    delta = dict(delta)
    for layer, increment in residual_increments(residuals).items():
        delta[layer] = delta[layer] + increment if layer in delta else increment.clone()
    return delta, end


def restored_base_delta(config: ConfigRecord, restore: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], int] | None:
    """FedEx-LoRA: the base delta this node held before a server restart and the residual
    rounds it covers, taken out of a ``restore`` record; None if the record carries none."""
    if "restore-base-held" not in config:
        return None
    residuals = {k: restore.pop(k) for k in list(restore) if split_residual_key(k)}
    return residual_increments(residuals), int(config["restore-base-held"])


def node_base_delta(context: Context, config: ConfigRecord,
                    residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """This node's accumulated base delta (FedEx-LoRA), updated in ``Context.state``."""
    records = context.state
    held = int(records["base-delta-rounds"]["rounds"]) if "base-delta-rounds" in records.config_records else 0
    delta = records["base-delta"].to_torch_state_dict() if held else {}
    delta, now_held = update_base_delta(delta, held, int(config.get("residual-from", 0)),
                                        int(config.get("residual-to", 0)), residuals)
    if now_held != held:
        records["base-delta"] = ArrayRecord(delta)
        records["base-delta-rounds"] = ConfigRecord({"rounds": now_held})
    return delta or None


def check_state_kept(config: ConfigRecord, has_state: bool) -> None:
    """Fail with ``STATE_LOST`` if the server expects this node to hold state from earlier
    rounds (``expect-state``: it has trained before, and the method keeps parts or a base
    delta) but its Context.state is empty: a SuperNode restarted under the same node id (node
    authentication). Training on would silently use the wrong factors (e.g. FedSVD's A_0)."""
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
    received = message.content["arrays"].to_torch_state_dict()
    restore = (message.content[RESTORE].to_torch_state_dict()
               if RESTORE in message.content.array_records else {})
    lost_base = restored_base_delta(cfg, restore)
    if lost_base:
        context.state["base-delta"] = ArrayRecord(lost_base[0])
        context.state["base-delta-rounds"] = ConfigRecord({"rounds": lost_base[1]})
    received.update(restore)
    residuals = {k: received.pop(k) for k in list(received) if split_residual_key(k)}
    bundle.set_base_delta(node_base_delta(context, cfg, residuals))
    keep, seeded = _parts(cfg, "keep-parts"), _parts(cfg, "seeded-parts")
    kept = context.state["kept"].to_torch_state_dict() if "kept" in context.state.array_records else {}
    delivered = {k: v for k, v in received.items() if part_of(k, bundle.head_keys) in keep}
    if delivered:  # the latest value of tensors this node keeps (Fed-SB's B and A, FedSVD's A)
        kept = {**kept, **delivered}
        context.state["kept"] = ArrayRecord(kept)
    initial = {k: v for k, v in bundle.initial_state.items() if part_of(k, bundle.head_keys) in seeded}
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
                                setup.rng)
    metrics = client_update(bundle.model, trainable, steps, float(cfg["lr"]), setup.device,
                            privacy)
    if privacy is not None:
        privacy.spend(local_steps, context.state)
        metrics = {**metrics, **privacy.metrics()}
    return setup.reply(message, bundle.state(trained), metrics)


@app.train("fedsb_init")
def fedsb_init(message: Message, context: Context) -> Message:
    setup = ClientSetup(message, context)
    bundle = setup.bundle
    bundle.set_base_delta(None)  # the pretrained W0, whatever a previous client left
    bundle.load(message.content["arrays"].to_torch_state_dict())  # the global head
    layers = dict(bundle.model.named_modules())
    with torch.no_grad():
        for name in bundle.adapted:  # R = 0: the adapters add nothing, so W0's gradient is
            layers[name].lora_R.weight.zero_()  # that of the plain pretrained model
    weights = {f"{name}.base.weight": layers[name].base.weight for name in bundle.adapted}
    share = int(message.content["config"]["init-samples"])
    privacy = ClientPrivacy.for_node(setup.config, context.state, len(setup.indices))
    if privacy is None:
        chosen = setup.rng.sample(list(setup.indices), min(share, len(setup.indices)))
        grads = base_gradient_sum(bundle.model, weights,
                                  setup.batches.epoch(chosen, int(setup.config["batch-size"])),
                                  setup.device)
        metrics = {}
    else:  # one Poisson-sampled Gaussian release (rate share / n_k), charged to the accountant
        rate = min(1.0, share / len(setup.indices))
        chosen = [i for i in setup.indices if setup.rng.random() < rate]
        grads = private_gradient_sum(bundle.model, weights, setup.batches, chosen, privacy.clip,
                                     privacy.noise_multiplier, setup.seed, setup.device)
        privacy.spend(1, context.state, rate=rate)
        metrics = privacy.metrics()
    reply = setup.reply(message, grads, metrics)
    # Under DP the Poisson sample's size is private: report the expected one.
    reply.content["metrics"]["num-examples"] = len(chosen) if privacy is None else share
    return reply
