"""fedlora's ClientApp: the same app in simulation (Ray) and deployment (SuperNodes).

It has no config of its own: every message carries the model, data and training settings in
its ConfigRecord. The pretrained model is built once per process and kept
(``fedlora.models.cached_model``); each message loads the full adapter state it needs into it,
so virtual clients sharing a Ray worker never see each other's tensors. Tensors a client must
keep across rounds (Fed-SB's B and A) live in the node's ``Context.state``.

Handlers (message types):
  query.describe     partition id, number of examples and label histogram of this node
  train              local steps on the parts named in ``trained-parts``; reply with them
  train.fedsb_init   the summed base-weight gradients for LoRA-SB's initialisation
"""

from __future__ import annotations

import os
import random
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import models
from fedlora.adapters import part_of
from fedlora.config import specs_from_client_config
from fedlora.data import Batches, client_partitions, load_dataset
from fedlora.clients.train import base_gradient_sum, client_update

app = ClientApp()


class ClientSetup:
    """This node's model, data and settings for one message."""

    def __init__(self, message: Message, context: Context):
        self.config = message.content["config"]
        cfg = self.config
        torch.set_num_threads(max(1, int(cfg["client-cpus"])))
        self.device = str(cfg["device"])
        self.model_spec, self.data_spec = specs_from_client_config(cfg)
        self.bundle = models.cached_model(self.model_spec, self.device)
        self.batches = _tokenised_train(self.model_spec, self.data_spec, int(cfg["max-length"]),
                                        self.device)
        self.partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        partitions = client_partitions(self.data_spec, num_partitions, str(cfg["partition"]),
                                       float(cfg["partition-alpha"]), int(cfg["seed"]))
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


@app.train()
def train(message: Message, context: Context) -> Message:
    setup = ClientSetup(message, context)
    cfg, bundle = setup.config, setup.bundle
    received = message.content["arrays"].to_torch_state_dict()
    keep = _parts(cfg, "keep-parts")
    kept = {k: v for k, v in received.items() if part_of(k, bundle.head_keys) in keep}
    if kept:  # first delivery of tensors this node keeps (Fed-SB's B and A)
        context.state["kept"] = ArrayRecord(kept)
    elif keep:
        if "kept" not in context.state.array_records:
            raise RuntimeError(f"node holds no {sorted(keep)} yet and the server sent none")
        received = {**context.state["kept"].to_torch_state_dict(), **received}
    missing = set(bundle.shapes()) - set(received)
    if missing:  # a shared cached model must never train on another client's leftovers
        raise RuntimeError(f"the server sent no value for {sorted(missing)[:3]} (and more)")
    bundle.load(received)
    trained = _parts(cfg, "trained-parts")
    trainable = bundle.set_trainable(trained)
    steps = setup.batches.sample_steps(setup.indices, int(cfg["batch-size"]),
                                       int(cfg["local-steps"]), setup.rng)
    metrics = client_update(bundle.model, trainable, steps, float(cfg["lr"]), setup.device)
    return setup.reply(message, bundle.state(trained), metrics)


@app.train("fedsb_init")
def fedsb_init(message: Message, context: Context) -> Message:
    setup = ClientSetup(message, context)
    bundle = setup.bundle
    bundle.load(message.content["arrays"].to_torch_state_dict())  # the global head
    layers = dict(bundle.model.named_modules())
    with torch.no_grad():
        for name in bundle.adapted:  # R = 0: the adapters add nothing, so W0's gradient is
            layers[name].lora_R.weight.zero_()  # that of the plain pretrained model
    weights = {f"{name}.base.weight": layers[name].base.weight for name in bundle.adapted}
    count = min(int(message.content["config"]["init-samples"]), len(setup.indices))
    chosen = setup.rng.sample(list(setup.indices), count)
    grads = base_gradient_sum(bundle.model, weights,
                              setup.batches.epoch(chosen, int(setup.config["batch-size"])),
                              setup.device)
    reply = setup.reply(message, grads, {})
    reply.content["metrics"]["num-examples"] = count
    return reply
