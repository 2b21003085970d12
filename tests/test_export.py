"""The fine-tuned model out of a run (``fedlora.model.export``), checked by loading it the way a user
would: peft's ``PeftModel.from_pretrained`` on a fresh base model (``DIR/adapter/``), or plain
``from_pretrained`` (``DIR/merged/``), whose logits must be fedlora's own model's.

The runs go through ``fedlora.run.server.run_server`` on the embedded MiniLM classifier with a
fake grid (no Ray): nodes that "train" by adding seeded noise to the parts their method trains,
from the state the ClientApp would assemble; what is tested is the export, not learning. The
causal-LM case uses a tiny random Llama with grouped-query attention (v_proj 64 -> 32).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedlora.model.adapters import inject_lora, lora_layers, part_of, split_residual_key
from fedlora.clients.app import full_adapter_state
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig
from fedlora.tasks.classification import Batches, TextDataset, TextSplit, evaluate
from fedlora.model.export import ADAPTER_DIR, ADAPTER_WEIGHTS, MERGED_DIR, export_run, target_modules
from fedlora.model.pretrained import AdaptedModel, build_model, model_path
from fedlora.run.server import run_server
from fedlora.strategies import get_strategy
from tests.federation import parts, reply

pytestmark = pytest.mark.usefixtures("flower_task")

TEXTS = ("the match ended in a draw", "shares fell sharply on monday", "a new phone was released",
         "the striker scored twice", "the central bank raised rates", "the chip is twice as fast",
         "fans cheered the home team", "oil prices rose again", "the app update fixes a bug",
         "the coach was sacked", "markets rallied at the close", "researchers built a new laser")
LABELS = (0, 1, 2) * 4
NUM_LABELS = 3
CLIENTS = 3
MAX_LENGTH = 16
TOLERANCE = 1e-5  # float32 logits: fedlora computes W0 x + s B (A x), peft the same, merged (W0 + s B A) x


class NoisyNode:
    """A node that adds seeded noise to the parts its method trains this round, starting from
    what the ClientApp would hold (sent, else kept, else the shared seed); its Fed-SB set-up
    reply is a random base-weight gradient of each adapted layer's shape."""

    def __init__(self, partition_id: int, bundle: AdaptedModel):
        self.partition_id = partition_id
        self.head_keys = bundle.head_keys
        self.initial = bundle.initial_state
        self.base_shapes = {name: bundle.pretrained_base[name].shape for name in bundle.adapted}
        self.kept: dict[str, torch.Tensor] = {}

    def answer(self, message: Message, seed: int) -> Message:
        gen = torch.Generator().manual_seed(seed)
        if message.metadata.message_type == SETUP_MESSAGE_TYPE:
            return reply(message, {f"{name}.base.weight": torch.randn(shape, generator=gen)
                                   for name, shape in self.base_shapes.items()}, 8)
        config = message.content["config"]
        received = {k: v for k, v in message.content["arrays"].to_torch_state_dict().items()
                    if split_residual_key(k) is None}  # FedEx's residuals: the node's own base
        keep, seeded = parts(config, "keep-parts"), parts(config, "seeded-parts")
        self.kept.update({k: v for k, v in received.items() if part_of(k, self.head_keys) in keep})
        seeds = {k: v for k, v in self.initial.items() if part_of(k, self.head_keys) in seeded}
        state = full_adapter_state(received, self.kept, seeds, self.initial)
        trained = parts(config, "trained-parts")
        update = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                  for k, v in state.items() if part_of(k, self.head_keys) in trained}
        return reply(message, update, 10, pid=1, **{"model-builds": 1})


class NoisyGrid:
    """Answers ``query.describe`` with each node's partition, every other message from its node."""

    def __init__(self, nodes: dict[int, NoisyNode]):
        self.nodes = nodes
        self.sent = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node = self.nodes[message.metadata.dst_node_id]
            if message.metadata.message_type == "query.describe":
                replies.append(Message(RecordDict({"metrics": MetricRecord({
                    "partition-id": node.partition_id, "num-examples": 10,
                    "label-histogram": [4, 3, 3]})}), reply_to=message))
            else:
                self.sent += 1
                replies.append(node.answer(message, seed=self.sent))
        return replies


def run(strategy: str, out, **overrides) -> tuple[AdaptedModel, list[dict]]:
    """A 3-round run of ``strategy`` through the server loop; its bundle and results rows."""
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": CLIENTS, "clients_per_round": CLIENTS,
                               "rounds": 3, "rank": 4, "max_length": MAX_LENGTH, **overrides})
    data = TextDataset(TextSplit(TEXTS, LABELS), TextSplit(TEXTS, LABELS), ("a", "b", "c"))
    bundle = build_model(cfg.model_spec(NUM_LABELS))
    grid = NoisyGrid({100 + p: NoisyNode(p, bundle) for p in range(CLIENTS)})
    run_server(grid, cfg, out, bundle, data)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return bundle, rows


def fedlora_final_model(bundle: AdaptedModel, out) -> torch.nn.Module:
    """fedlora's model with the run's saved final state (``final_adapter.pt``) in it."""
    final = torch.load(out / "final_adapter.pt", weights_only=False)
    bundle.set_base_delta(final["base_delta"])
    bundle.load(final["adapter"])
    return bundle.model.eval()


def texts_batch(tokenizer) -> dict[str, torch.Tensor]:
    batches = Batches(tokenizer, TEXTS, LABELS, MAX_LENGTH)
    batch = batches.collate(range(len(TEXTS)))  # padded: the attention mask matters too
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def fresh_base_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_path("minilm"),
                                                              num_labels=NUM_LABELS)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def accuracy(model, tokenizer) -> float:
    return evaluate(SimpleNamespace(model=model), Batches(tokenizer, TEXTS, LABELS, MAX_LENGTH))["accuracy"]


@torch.no_grad()
def adapters_change_logits(model, batch) -> float:
    """How far the logits move when every adapter's B is zeroed (the adapters' own effect)."""
    with_adapters = logits(model, batch)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.zero_()
    return (with_adapters - logits(model, batch)).abs().max().item()


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb", "fedsvd", "rolora"])
def test_peft_loads_the_adapter_folder_and_reproduces_the_last_row(strategy, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    # Prepare: a run, and a user's fresh base model
    bundle, rows = run(strategy, tmp_path)
    base = fresh_base_classifier()

    # Execute: load the run's adapter folder as a user would
    exported = PeftModel.from_pretrained(base, tmp_path / ADAPTER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / ADAPTER_DIR)

    # Assert: the same logits as fedlora's final model, hence the last row's score
    batch = texts_batch(tokenizer)
    ours = fedlora_final_model(bundle, tmp_path)
    assert (logits(exported, batch) - logits(ours, batch)).abs().max().item() < TOLERANCE
    assert accuracy(exported, tokenizer) == rows[-1]["accuracy"]
    assert not (tmp_path / MERGED_DIR).exists()  # export.merge defaults to false
    config = json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["task_type"], config["r"], config["modules_to_save"]) == ("SEQ_CLS", 4, ["classifier"])
    assert sorted(config["target_modules"]) == ["query", "value"]
    # The adapters move the logits far more than the tolerance: equal logits are no accident.
    assert adapters_change_logits(ours, batch) > 100 * TOLERANCE


def test_fedsb_exports_plain_lora_with_b_times_r(tmp_path):
    # Prepare
    bundle, _ = run("fedsb", tmp_path)
    final = torch.load(tmp_path / "final_adapter.pt", weights_only=False)["adapter"]
    layer = bundle.adapted[0]

    # Execute
    tensors = load_file(tmp_path / ADAPTER_DIR / ADAPTER_WEIGHTS)
    config = json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())

    # Assert: B' = B R, A' = A, no R anywhere, Fed-SB's scale s = alpha / rank = 1
    B, R, A = (final[f"{layer}.lora_{p}.weight"] for p in "BRA")
    assert torch.allclose(tensors[f"base_model.model.{layer}.lora_B.weight"], B @ R, atol=1e-6)
    assert torch.equal(tensors[f"base_model.model.{layer}.lora_A.weight"], A)
    assert not [key for key in tensors if "lora_R" in key]
    assert config["lora_alpha"] / config["r"] == 1.0


def test_fedex_writes_a_merged_model_that_reproduces_the_last_row(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # Prepare: FedEx moves the base weights, so its adapter alone is not the model
    bundle, rows = run("fedex", tmp_path)

    # Execute: plain transformers, no peft
    merged, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / MERGED_DIR, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / MERGED_DIR)

    # Assert: every weight found and used, no adapter left, fedlora's logits and score
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not [name for name, _ in merged.named_modules() if "lora" in name]
    assert not (tmp_path / ADAPTER_DIR).exists()
    batch = texts_batch(tokenizer)
    ours = fedlora_final_model(bundle, tmp_path)
    assert bundle.base_is_pretrained is False  # the run did move the base weights
    assert (logits(merged, batch) - logits(ours, batch)).abs().max().item() < TOLERANCE
    assert accuracy(merged, tokenizer) == rows[-1]["accuracy"]


def test_merge_true_adds_a_merged_model_for_fedavg_and_leaves_the_server_model_as_it_was(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    # Prepare
    bundle, rows = run("fedavg", tmp_path, export={"merge": True})

    # Execute
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / MERGED_DIR)
    exported = PeftModel.from_pretrained(fresh_base_classifier(), tmp_path / ADAPTER_DIR)

    # Assert: both folders, the same logits; the server's model still has its adapter layers
    batch = texts_batch(bundle.tokenizer)
    ours = fedlora_final_model(bundle, tmp_path)
    assert set(lora_layers(bundle.model)) == set(bundle.adapted)
    assert (logits(merged, batch) - logits(ours, batch)).abs().max().item() < TOLERANCE
    assert (logits(exported, batch) - logits(ours, batch)).abs().max().item() < TOLERANCE
    assert accuracy(merged, bundle.tokenizer) == rows[-1]["accuracy"]


# ----------------------------------------------------------------------------- causal LM


def tiny_llama():
    """A 2-block random Llama, grouped-query attention: v_proj is 64 -> 32 (non-square), tied
    input and output embeddings (as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_causal_lm_adapter_loads_with_peft_with_equal_logits(strategy, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare: the base saved as a user's model folder; fedlora's copy with adapters on
    # q_proj and v_proj holding a random (trained-looking) state, no head
    tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    cls = get_strategy(strategy)
    adapted = inject_lora(model, ("q_proj", "v_proj"), rank=4, alpha=8.0, latent=cls.latent)
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"))  # any tokenizer travels
    bundle = AdaptedModel.from_adapted(model, tokenizer, adapted, frozenset())
    gen = torch.Generator().manual_seed(1)
    bundle.load({k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in bundle.initial_state.items()})
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 2, "rank": 4, "alpha": 8.0})

    # Execute
    export_run(bundle, cls.from_config(cfg, frozenset()), bundle.state(("A", "B", "R")), tmp_path, merged=True)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / ADAPTER_DIR)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / MERGED_DIR)

    # Assert: fedlora's logits (adapter and merged), peft's own key names, the tokenizer alongside
    ids = torch.randint(1, 96, (3, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert (logits(exported, batch) - logits(bundle.model, batch)).abs().max().item() < TOLERANCE
    assert (logits(merged, batch) - logits(bundle.model, batch)).abs().max().item() < TOLERANCE
    assert adapters_change_logits(bundle.model, batch) > 100 * TOLERANCE
    config = json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    peft_own = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
    peft_own.save_pretrained(tmp_path / "peft_own")
    assert set(load_file(tmp_path / ADAPTER_DIR / ADAPTER_WEIGHTS)) == \
        set(load_file(tmp_path / "peft_own" / ADAPTER_WEIGHTS))
    assert (tmp_path / ADAPTER_DIR / "tokenizer_config.json").is_file()


def test_targets_are_leaf_names_only_when_they_name_exactly_the_adapted_layers():
    # Prepare: adapters on every q_proj and v_proj
    model = tiny_llama()
    adapted = inject_lora(model, ("q_proj", "v_proj"), rank=2, alpha=2.0, latent=False)

    # Execute / Assert: all of them -> leaf names; only layer 0's q_proj -> its path, since
    # peft would match "q_proj" in layer 1 too
    assert target_modules(model, adapted) == ["q_proj", "v_proj"]
    assert target_modules(model, adapted[:1]) == ["model.layers.0.self_attn.q_proj"]
