"""The real embedded model (all-MiniLM-L6-v2) with LoRA-SB adapters, loaded once per module.

Checks what Fed-SB relies on: only R and the head train, B, A and the base weights stay
bit-identical, server and clients build identical adapters from the seed, and the base-weight
gradient sums add up over clients (ALGORITHMS.md, "Invariants" 1 and the Fed-SB init).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.model.adapters import PARTS, lora_layers
from fedlora.aggregation.maths import lora_sb_init
from fedlora.clients.train import base_gradient_sum, client_update
from fedlora.tasks.classification import Batches
from fedlora.model.pretrained import ModelSpec, build_model

SPEC = ModelSpec(num_labels=21, rank=4, alpha=8, latent=True, init_seed=0)
HEAD_KEYS = {"classifier.weight", "classifier.bias"}
TEXTS = ("hello there", "what is the weather like today", "tell me a joke", "do you like music")
LABELS = (0, 3, 7, 20)


@pytest.fixture(scope="module")
def built():
    """The model, built once, and its adapter/head state right after the build."""
    bundle = build_model(SPEC)
    return bundle, bundle.state(PARTS)


@pytest.fixture
def bundle(built):
    """The module's model, reset to its freshly built adapter state and trainability."""
    bundle, initial = built
    bundle.load(initial)
    bundle.set_trainable(("A", "B", "R", "head"))
    for param in bundle.model.parameters():
        param.grad = None
    return bundle


@pytest.fixture
def batches(bundle):
    return Batches(bundle.tokenizer, TEXTS, LABELS, 32)


def base_weights(bundle) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.base.weight": layer.base.weight for name, layer in lora_layers(bundle.model).items()}


def test_model_layout(bundle):
    # Execute
    shapes = bundle.shapes()
    layers = lora_layers(bundle.model)

    # Assert
    assert bundle.head_keys == HEAD_KEYS
    assert len(bundle.adapted) == 12
    assert bundle.adapted == list(layers)
    expected = [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(6) for t in ("query", "value")]
    assert bundle.adapted == expected
    for name, layer in layers.items():
        assert tuple(layer.base.weight.shape) == (384, 384)
        assert shapes[f"{name}.lora_A.weight"] == (4, 384)
        assert shapes[f"{name}.lora_B.weight"] == (384, 4)
        assert shapes[f"{name}.lora_R.weight"] == (4, 4)
        assert layer.scale == 2.0
    assert shapes["classifier.weight"] == (21, 384)
    assert shapes["classifier.bias"] == (21,)
    assert len(shapes) == 12 * 3 + 2


def test_set_trainable_R_and_head_only(bundle):
    # Execute
    trainable = bundle.set_trainable(("R", "head"))

    # Assert
    names = {name for name, p in bundle.model.named_parameters() if p.requires_grad}
    expected = {f"{layer}.lora_R.weight" for layer in bundle.adapted} | HEAD_KEYS
    assert names == expected
    assert len(trainable) == 14
    assert {id(p) for p in trainable} == {id(p) for n, p in bundle.model.named_parameters() if n in expected}
    for layer in lora_layers(bundle.model).values():
        assert not layer.base.weight.requires_grad
        assert not layer.lora_A.weight.requires_grad
        assert not layer.lora_B.weight.requires_grad
    assert not bundle.model.bert.embeddings.word_embeddings.weight.requires_grad


def test_client_update_of_R_leaves_A_B_and_base_bit_identical(bundle, batches):
    # Prepare: a Fed-SB start (orthonormal B, A; R = diag(S)); with LoRA's B = 0, R gets no gradient
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(bundle.model).values():
            B, R, A = lora_sb_init(torch.randn(384, 384, generator=gen, dtype=torch.float64), 4, 1e-3)
            layer.lora_B.weight.copy_(B)
            layer.lora_R.weight.copy_(R)
            layer.lora_A.weight.copy_(A)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    trainable = bundle.set_trainable(("R", "head"))

    # Execute
    report = client_update(bundle.model, trainable, batches.epoch(range(4), 2), lr=1e-2)

    # Assert
    assert report["steps"] == 2
    assert report["train_loss"] > 0
    after = bundle.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    expected = sorted([f"{layer}.lora_R.weight" for layer in bundle.adapted] + list(HEAD_KEYS))
    assert changed == expected


def test_same_init_seed_gives_identical_adapters_and_head(built):
    # Prepare
    _, initial = built

    # Execute
    again = build_model(SPEC).state(PARTS)
    other_seed = build_model(ModelSpec(num_labels=21, rank=4, alpha=8, latent=True, init_seed=1)).state(PARTS)

    # Assert
    assert set(again) == set(initial)
    for key in initial:
        assert torch.equal(again[key], initial[key]), key
    a_key = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert not torch.equal(other_seed[a_key], initial[a_key])
    assert not torch.equal(other_seed["classifier.weight"], initial["classifier.weight"])


def test_state_load_round_trip_and_rejects_non_adapter_key(bundle):
    # Prepare
    key = "bert.encoder.layer.2.attention.self.value.lora_R.weight"
    new_R = torch.arange(16, dtype=torch.float32).reshape(4, 4)

    # Execute
    bundle.load({key: new_R})

    # Assert
    assert torch.equal(bundle.state(("R",))[key], new_R)
    assert set(bundle.state(("head",))) == HEAD_KEYS
    base_key = "bert.encoder.layer.0.attention.self.query.base.weight"
    with pytest.raises(KeyError, match="is not an adapter or head tensor"):
        bundle.load({base_key: torch.zeros(384, 384)})
    with pytest.raises(KeyError, match="not.in.model.lora_A.weight"):
        bundle.load({"not.in.model.lora_A.weight": torch.zeros(4, 384)})


def test_base_gradient_sum_shapes_and_refreezes(bundle, batches):
    # Prepare
    weights = base_weights(bundle)

    # Execute
    grads = base_gradient_sum(bundle.model, weights, batches.epoch([0], 1))

    # Assert
    assert list(grads) == list(weights)
    assert len(grads) == 12
    for key, weight in weights.items():
        assert grads[key].shape == weight.shape == (384, 384)
        assert grads[key].device.type == "cpu"
        assert torch.count_nonzero(grads[key]).item() > 0
        assert not weight.requires_grad


@pytest.mark.parametrize("dropout", [True, False], ids=["with-dropout", "without-dropout"])
def test_base_gradient_sum_adds_over_halves_of_a_batch(bundle, batches, monkeypatch, dropout):
    # Prepare: two clients holding half the examples each, and the pooled batch; with every
    # dropout disabled the check isolates the summation itself
    if not dropout:
        for module in bundle.model.modules():
            if isinstance(module, torch.nn.Dropout):
                monkeypatch.setattr(module, "p", 0.0)
    weights = base_weights(bundle)

    # Execute
    pooled = base_gradient_sum(bundle.model, weights, batches.epoch(range(4), 4))
    half_1 = base_gradient_sum(bundle.model, weights, batches.epoch([0, 1], 2))
    half_2 = base_gradient_sum(bundle.model, weights, batches.epoch([2, 3], 2))

    # Assert
    worst = max((half_1[k] + half_2[k] - pooled[k]).abs().max().item() for k in weights)
    assert worst <= 1e-5
    assert max(pooled[k].abs().max().item() for k in weights) > 1e-3


def test_initial_state_is_the_adapter_state_right_after_the_build(built):
    # Prepare
    bundle, initial = built

    # Assert: FFA-LoRA's clients take their frozen A from it
    assert bundle.initial_state.keys() == initial.keys()
    assert all(torch.equal(bundle.initial_state[k], initial[k]) for k in initial)


def test_base_delta_is_set_per_layer_and_undone_bit_for_bit(bundle):
    # Prepare
    first, second = bundle.adapted[:2]
    layers = lora_layers(bundle.model)
    pretrained = {name: layers[name].base.weight.detach().clone() for name in (first, second)}
    delta = torch.full_like(pretrained[first], 0.5)

    # Execute
    bundle.set_base_delta({first: delta})
    shifted = layers[first].base.weight.detach().clone()
    untouched = layers[second].base.weight.detach().clone()
    bundle.set_base_delta(None)

    # Assert
    assert torch.equal(shifted, pretrained[first] + delta)
    assert torch.equal(untouched, pretrained[second])
    assert torch.equal(layers[first].base.weight, pretrained[first])
    with pytest.raises(KeyError, match="not adapted"):
        bundle.set_base_delta({"classifier": delta})


def test_client_update_with_sgd_takes_one_plain_gradient_step_at_each_groups_lr(bundle, batches):
    # Prepare: the oracle, the mean loss's gradient on the same batch by autograd
    trainable = bundle.set_trainable(("A", "B", "head"))
    head = [param for key, param in bundle.model.named_parameters() if key in HEAD_KEYS]
    lrs = [5.0 if any(param is h for h in head) else 0.5 for param in trainable]
    batch = next(iter(batches.epoch(range(4), 1)))
    bundle.model.train()
    torch.manual_seed(0)  # dropout: the same masks in the oracle's pass and the update's
    loss = torch.nn.functional.cross_entropy(bundle.model(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]).logits,
                                             batch["labels"])
    grads = torch.autograd.grad(loss, trainable)
    expected = [(p - lr * g).detach().clone() for p, g, lr in zip(trainable, grads, lrs)]

    # Execute
    torch.manual_seed(0)
    client_update(bundle.model, trainable, [batch], lr=0.5, optimizer="sgd", head=head, head_lr=5.0)

    # Assert: p <- p - lr * grad (the head at head_lr), with no per-coordinate rescaling
    # (AdamW's first step is lr * sign(grad))
    assert sorted(lrs).count(5.0) == 2
    for param, want in zip(trainable, expected):
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6)
