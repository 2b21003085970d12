"""The LoRA / LoRA-SB layer and its injection (fedlora.model.adapters), on tiny nn.Linear modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.model.adapters import LoRALinear, inject_lora, lora_layers, part_of

F64 = torch.float64


def tiny_base(in_features: int = 7, out_features: int = 5, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(F64)


def random_input(rows: int = 3, features: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------------------------
# LoRALinear


@pytest.mark.parametrize("latent", [False, True])
def test_lora_linear_starts_as_the_base_layer(latent):
    # Prepare
    base = tiny_base()
    x = random_input()
    expected = base(x)

    # Execute
    layer = LoRALinear(base, rank=3, alpha=6.0, latent=latent)

    # Assert
    assert layer.scale == 2.0
    assert layer.lora_A.weight.shape == (3, 7)
    assert layer.lora_B.weight.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_A.weight).item() == 21  # Kaiming-uniform, not zero
    assert torch.equal(layer.lora_B.weight, torch.zeros(5, 3, dtype=F64))
    if latent:
        assert torch.equal(layer.lora_R.weight, torch.eye(3, dtype=F64))
    else:
        assert layer.lora_R is None
    delta = layer.delta_weight()
    assert delta.shape == (5, 7)
    assert torch.equal(delta, torch.zeros(5, 7, dtype=F64))
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("latent", [False, True])
def test_lora_linear_forward_matches_delta_weight(latent):
    # Prepare: a non-square layer (in 7, out 5) with random factors
    base = tiny_base()
    layer = LoRALinear(base, rank=3, alpha=6.0, latent=latent)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(3, 7, generator=gen, dtype=F64))
        layer.lora_B.weight.copy_(torch.randn(5, 3, generator=gen, dtype=F64))
        if latent:
            layer.lora_R.weight.copy_(torch.randn(3, 3, generator=gen, dtype=F64))
    x = random_input()

    # Execute
    delta = layer.delta_weight()
    output = layer(x)

    # Assert
    middle = layer.lora_A.weight if not latent else layer.lora_R.weight @ layer.lora_A.weight
    assert delta.shape == base.weight.shape == (5, 7)
    assert torch.allclose(delta, 2.0 * layer.lora_B.weight @ middle, atol=1e-12, rtol=0)
    assert output.shape == (3, 5)
    assert torch.allclose(output, base(x) + x @ delta.T, atol=1e-6, rtol=0)
    # Same as a dense layer with the merged weight W0 + s B [R] A.
    merged = torch.nn.functional.linear(x, base.weight + delta, base.bias)
    assert torch.allclose(output, merged, atol=1e-12, rtol=0)
    assert torch.count_nonzero(delta).item() > 0


def test_lora_linear_keeps_base_layer_and_dtype():
    # Prepare
    base = tiny_base()

    # Execute
    layer = LoRALinear(base, rank=2, alpha=2.0, latent=True)

    # Assert
    assert layer.base is base
    assert layer.lora_A.weight.dtype == layer.lora_R.weight.dtype == layer.lora_B.weight.dtype == F64
    assert layer.lora_R.weight.shape == (2, 2)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None and layer.lora_R.bias is None


# --------------------------------------------------------------------------------------------
# inject_lora


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(6, 6)
        self.key = nn.Linear(6, 6)
        self.value = nn.Linear(6, 4)
        self.dense = nn.Linear(4, 6)


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([TinyAttention(), TinyAttention()])
        self.classifier = nn.Linear(6, 3)


def test_inject_lora_replaces_exactly_the_targets():
    # Prepare
    torch.manual_seed(0)
    model = TinyEncoder()
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    # Execute
    adapted = inject_lora(model, ("query", "value"), rank=2, alpha=4.0, latent=False)

    # Assert
    assert adapted == ["layer.0.query", "layer.0.value", "layer.1.query", "layer.1.value"]
    layers = lora_layers(model)
    assert list(layers) == adapted
    for name in adapted:
        assert layers[name].base is originals[name]
        assert layers[name].lora_R is None
    for name in ("layer.0.key", "layer.1.key", "layer.0.dense", "layer.1.dense", "classifier"):
        module = model.get_submodule(name)
        assert type(module) is nn.Linear
        assert module is originals[name]
    assert model.get_submodule("layer.1.value").lora_B.weight.shape == (4, 2)


def test_inject_lora_at_top_level_and_latent():
    # Prepare
    model = nn.Module()
    model.query = nn.Linear(3, 2)
    model.other = nn.Linear(3, 3)

    # Execute
    adapted = inject_lora(model, ("query",), rank=1, alpha=1.0, latent=True)

    # Assert
    assert adapted == ["query"]
    assert isinstance(model.query, LoRALinear)
    assert model.query.lora_R.weight.shape == (1, 1)
    assert isinstance(model.other, nn.Linear) and not isinstance(model.other, LoRALinear)


def test_inject_lora_raises_when_nothing_matches():
    # Prepare
    model = TinyEncoder()

    # Execute / Assert
    with pytest.raises(ValueError, match=r"no nn.Linear layer is named one of \['q_proj', 'v_proj'\]"):
        inject_lora(model, ("q_proj", "v_proj"), rank=2, alpha=4.0, latent=False)
    assert lora_layers(model) == {}


def test_injected_state_dict_keys_classify_by_part():
    # Prepare
    model = TinyEncoder()
    inject_lora(model, ("query",), rank=2, alpha=4.0, latent=True)
    head = frozenset({"classifier.weight", "classifier.bias"})

    # Execute
    parts = {key: part_of(key, head) for key in model.state_dict()}

    # Assert
    assert sorted(k for k, p in parts.items() if p == "A") == [
        "layer.0.query.lora_A.weight", "layer.1.query.lora_A.weight"]
    assert sorted(k for k, p in parts.items() if p == "R") == [
        "layer.0.query.lora_R.weight", "layer.1.query.lora_R.weight"]
    assert sorted(k for k, p in parts.items() if p == "B") == [
        "layer.0.query.lora_B.weight", "layer.1.query.lora_B.weight"]
    assert sorted(k for k, p in parts.items() if p == "head") == sorted(head)
    assert parts["layer.0.query.base.weight"] is None
    assert parts["layer.0.key.weight"] is None


# --------------------------------------------------------------------------------------------
# part_of


@pytest.mark.parametrize("key,part", [
    ("bert.encoder.layer.0.attention.self.query.lora_A.weight", "A"),
    ("bert.encoder.layer.5.attention.self.value.lora_B.weight", "B"),
    ("bert.encoder.layer.3.attention.self.query.lora_R.weight", "R"),
    ("classifier.weight", "head"),
    ("classifier.bias", "head"),
    ("bert.encoder.layer.0.attention.self.query.base.weight", None),
    ("bert.encoder.layer.0.attention.self.query.base.bias", None),
    ("bert.embeddings.word_embeddings.weight", None),
    ("bert.pooler.dense.weight", None),
])
def test_part_of_classifies_keys(key, part):
    # Prepare
    head = frozenset({"classifier.weight", "classifier.bias"})

    # Execute / Assert
    assert part_of(key, head) == part


def test_part_of_head_needs_head_keys():
    # Execute / Assert: without head keys the classifier is frozen base
    assert part_of("classifier.weight", frozenset()) is None


# --------------------------------------------------------------------------------------------
# Clients of different ranks on one model


def test_set_rank_resizes_the_factors_keeps_the_scale_and_draws_no_random_numbers():
    # Prepare
    layer = LoRALinear(tiny_base(), rank=4, alpha=8.0, latent=False)
    B, A = torch.randn(5, 2, dtype=F64), torch.randn(2, 7, dtype=F64)
    x = random_input()
    rng = torch.get_rng_state()

    # Execute
    layer.set_rank(2)
    with torch.no_grad():
        layer.lora_B.weight.copy_(B)
        layer.lora_A.weight.copy_(A)
    out = layer(x)

    # Assert: rank-2 factors at the build's scale 8 / 4, and the seeded streams untouched
    assert torch.equal(torch.get_rng_state(), rng)
    assert layer.rank == 2 and layer.scale == 2.0
    assert (out - (layer.base(x) + 2.0 * x @ A.T @ B.T)).abs().max() <= 1e-12
    layer.set_rank(4)
    assert layer.lora_A.weight.shape == (4, 7) and layer.lora_B.weight.shape == (5, 4)


def test_at_rank_truncates_and_zero_pads_factors_and_leaves_the_rest():
    # Prepare
    from fedlora.model.adapters import at_rank, state_at_rank

    B, A = torch.randn(5, 3, dtype=F64), torch.randn(3, 7, dtype=F64)
    head = torch.randn(2, 5, dtype=F64)
    state = {"l.lora_B.weight": B, "l.lora_A.weight": A, "head.weight": head}

    # Execute
    two, five = state_at_rank(state, 2), state_at_rank(state, 5)

    # Assert: the first components; zero padding keeps the product; same rank: same tensor
    assert torch.equal(two["l.lora_B.weight"], B[:, :2]) and torch.equal(two["l.lora_A.weight"], A[:2])
    assert five["l.lora_B.weight"].shape == (5, 5) and five["l.lora_A.weight"].shape == (5, 7)
    assert torch.equal(five["l.lora_B.weight"] @ five["l.lora_A.weight"], B @ A)
    assert two["head.weight"] is head and at_rank("l.lora_A.weight", A, 3) is A
    R = torch.randn(3, 3, dtype=F64)
    assert torch.equal(at_rank("l.lora_R.weight", R, 2), R[:2, :2])
