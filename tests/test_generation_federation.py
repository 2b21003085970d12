"""A generative task (``task=sft``) through the server loop and the real ClientApp, every method.

No Ray: ``run_server`` drives an in-process grid whose nodes answer with the ClientApp's own
handlers (``fedlora.clients.app``: describe, train, the set-up step), each node with its own
``Context``. The model is a tiny random Llama saved as a local folder (2 blocks, grouped-query
attention: v_proj is 64 -> 32, non-square) with a one-token-per-character tokenizer and a chat
template (``tests.test_generation_task``), loaded by the task's own loader.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from fedlora.clients.app import describe, setup, train
from fedlora.clients.train import base_gradient_sum
from fedlora.report.comm import expected_params
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.run.server import prepare, run_server
from fedlora.strategies import STRATEGIES
from fedlora.model.pretrained import ModelSpec, build_model
from tests.test_generation_task import char_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("flower_task")

CLIENTS, ROUNDS, RANK = 2, 2, 2
FP32 = 4


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = char_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft-data")
    rows = [{"prompt": f"What is {a} + {b}?", "response": str(a + b)}
            for a, b in ((3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (12, 1), (4, 4), (9, 3))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    return folder


class ClientAppGrid:
    """Node 100 + p serves partition p with the ClientApp's handlers and its own Context."""

    HANDLERS = {"query.describe": describe, "train": train, "train.setup": setup}

    def __init__(self, clients: int):
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(),
                                          run_config={},
                                          node_config={"partition-id": p, "num-partitions": clients})
                         for p in range(clients)}
        self.message_types: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.message_types.append(message.metadata.message_type)
            handler = self.HANDLERS[message.metadata.message_type]
            replies.append(handler(message, self.contexts[message.metadata.dst_node_id]))
        return replies


def sft_config(strategy: str, llama_folder, sft_data, **overrides) -> RunConfig:
    return RunConfig.from_dict({"task": "sft", "strategy": strategy, "model": str(llama_folder),
                                "data": {"path": str(sft_data)}, "clients": CLIENTS,
                                "clients_per_round": CLIENTS, "rounds": ROUNDS, "local_steps": 1,
                                "batch_size": 2, "rank": RANK, "max_length": 48, "eval_every": 1,
                                "eval": {"max_examples": 2, "max_new_tokens": 3},
                                "fedsb": {"init_samples": 3}, **overrides})


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_method_trains_a_causal_lm_with_only_adapters_on_the_wire(strategy, llama_folder,
                                                                        sft_data, tmp_path):
    # Prepare
    cfg = sft_config(strategy, llama_folder, sft_data)
    data, bundle = prepare(cfg)
    grid = ClientAppGrid(CLIENTS)

    # Execute
    summary = run_server(grid, cfg, tmp_path, bundle, data)

    # Assert: generation metrics in every row, and in the summary as the primary metric
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows:
        assert 0.0 <= row["exact_match"] <= 1.0 and row["exact_match"] * 2 == int(row["exact_match"] * 2)
        assert row["eval_loss"] > 0 and "accuracy" not in row and "loss" not in row
    assert all(r["clients_trained"] == CLIENTS for r in rows[1:])
    assert summary["primary_metric"] == "exact_match" and summary["task"] == "sft"
    assert summary["final_exact_match"] == rows[-1]["exact_match"]
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"]
    assert summary["initial_exact_match"] == rows[0]["exact_match"]
    # No head: the trained state is LoRA factors of the 2 x (q_proj, v_proj) layers only.
    assert bundle.head_keys == frozenset() and summary["head_params"] == 0
    assert sorted(bundle.adapted) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                            for p in ("q_proj", "v_proj"))
    shapes = [tuple(bundle.model.get_submodule(n).base.weight.shape) for n in bundle.adapted]
    assert (32, 64) in shapes  # grouped-query v_proj: out 32, in 64
    # bytes = formula in round 2 (steady state: both clients took part in round 1)
    formula = expected_params(STRATEGIES[strategy], shapes, RANK, 0, server_round=2)
    assert rows[2]["params_up_per_client"] == formula["up"]
    assert rows[2]["bytes_up"] == CLIENTS * formula["up"] * FP32
    assert all(r["train_loss"] > 0 for r in rows[1:])
    if strategy == "fedsb":  # the set-up gradient: every adapted m x n weight, both clients
        assert grid.message_types.count("train.setup") == CLIENTS
        assert rows[0]["bytes_up"] == CLIENTS * sum(m * n for m, n in shapes) * FP32
        # B and A come from the SVD of that gradient (LoRA-SB init), not the seeded init:
        # A's rows are orthonormal, and Fed-SB never trains them afterwards.
        final = torch.load(tmp_path / "final_adapter.pt")["adapter"]
        for name in bundle.adapted:
            A = final[f"{name}.lora_A.weight"]
            assert not torch.equal(A, bundle.initial_state[f"{name}.lora_A.weight"])
            torch.testing.assert_close(A @ A.T, torch.eye(RANK), atol=1e-4, rtol=0)


def test_base_gradient_sum_of_the_sft_loss_is_the_sum_over_examples(llama_folder, sft_data):
    # Prepare
    cfg = sft_config("fedsb", llama_folder, sft_data)
    task = cfg.task_spec()
    _, bundle = prepare(cfg)
    examples = task.training_examples(bundle.tokenizer, cfg.max_length)
    weights = {"q": bundle.model.get_submodule("model.layers.1.self_attn.q_proj").base.weight}

    # Execute: one batch of 3 (right-padded) and 3 batches of one
    together = base_gradient_sum(bundle.model, weights, [examples.collate([0, 1, 2])],
                                 loss=task.loss)["q"]
    apart = sum(base_gradient_sum(bundle.model, weights, [examples.collate([i])],
                                  loss=task.loss)["q"] for i in range(3))

    # Assert: a sum of per-example losses, so padding and batching change nothing
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-6)
    assert together.abs().sum() > 0


def test_a_classification_model_folder_is_refused_for_a_generative_task(tmp_path, sft_data):
    # Prepare: a folder whose config.json names a sequence classifier
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                    "model_type": "bert"}))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"model='.*bert' is not a causal language model \(its "
                                          r"config.json names BertModel\); task=sft generates text"):
        build_model(ModelSpec(name=str(folder), task="sft"))


def test_dp_sgd_on_the_causal_lm_with_zero_noise_and_huge_clip_equals_plain_training(
        llama_folder, sft_data):
    # Prepare: float64, so the order of summation (per-example sums vs the batch gradient)
    # cannot show; Opacus computes per-example gradients of the LoRA factors from 3-D
    # activations (batch, tokens, features) through the task's per-example loss
    from fedlora.clients.dp import ClientPrivacy
    from fedlora.clients.train import client_update

    cfg = sft_config("fedavg", llama_folder, sft_data)
    task = cfg.task_spec()
    _, bundle = prepare(cfg)
    examples = task.training_examples(bundle.tokenizer, cfg.max_length)
    bundle.model.double()
    batches = [examples.collate([0, 1, 2]), examples.collate([3, 4, 5])]

    def train_once(privacy):
        bundle.load({k: v.double() for k, v in bundle.initial_state.items()})
        trainable = bundle.set_trainable(("A", "B"))
        torch.manual_seed(0)
        client_update(bundle.model, trainable, batches, 1e-2, privacy=privacy, loss=task.loss)
        return bundle.state(("A", "B"))

    # Execute
    plain = train_once(None)
    private = train_once(ClientPrivacy(target_epsilon=3.0, delta=1e-5, clip=1e9,
                                       accountant="rdp", noise_multiplier=0.0, sample_rate=0.5,
                                       batch_size=3, noise_generator=torch.Generator()))

    # Assert: every factor moved, and identically with and without Opacus
    for key in plain:
        update = (plain[key] - bundle.initial_state[key].double()).abs().max()
        assert update > 0, key
        assert (private[key] - plain[key]).abs().max() <= 1e-9 * update, key
