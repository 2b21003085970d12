"""The fine-tuned model out of a run: a peft LoRA adapter folder, or a merged model.

``DIR/adapter/``  peft's LoRA format (``adapter_config.json``, ``adapter_model.safetensors``)
                  plus the tokenizer: ``PeftModel.from_pretrained(base, DIR/adapter)`` on a fresh
                  base model gives the run's final model (its logits, hence its last score). A
                  classification head travels as peft's ``modules_to_save``.
``DIR/merged/``   ``save_pretrained`` of the base model with each adapted weight replaced by
                  ``W0 + delta + s B A`` and no adapter layers, plus the tokenizer: loads with the
                  plain ``AutoModelFor...`` class, no peft needed.

Which is written: ``DIR/adapter/``, unless the method moved the base weights (its strategy
reports a base delta, ``FederatedLoRA.global_base_delta``: FedEx-LoRA), whose adapter alone
would be applied to the wrong W0; then ``DIR/merged/`` only. ``export.merge=true`` adds
``DIR/merged/`` for every method. The factors exported are the strategy's plain-LoRA form of
its update (``FederatedLoRA.export_factors``: Fed-SB's LoRA-SB ``B R A`` becomes ``B' = B R``,
``A' = A``), at the run's own scale ``s = alpha / rank``.

peft (0.21.2) names a LoRA factor ``base_model.model.<module path>.lora_A.weight`` (and
``lora_B``), a saved head tensor ``base_model.model.<key>``; its scale is
``lora_alpha / r``. fedlora's ``lora_A.weight`` (r x n) and ``lora_B.weight`` (m x r) have
peft's layout, so they are written as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fedlora.model.adapters import lora_layers

log = logging.getLogger("fedlora")

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
PEFT_PREFIX = "base_model.model."  # where peft's PeftModel puts the wrapped model
ADAPTER_WEIGHTS = "adapter_model.safetensors"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (B m x r, A r x n)


def task_type(model: nn.Module) -> str | None:
    """peft's task type for the model's class (None: a plain module, peft's generic model)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def head_modules(head_keys) -> list[str]:
    """The modules owning the head's tensors (``classifier.weight`` -> ``classifier``)."""
    return sorted({key.rpartition(".")[0] for key in head_keys})


def target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """What peft's ``target_modules`` lists: the adapted layers' leaf names when those match
    exactly the adapted layers (peft matches a name by its last components), else their paths."""
    leaves = {path.rpartition(".")[2] for path in adapted}
    inside = tuple(f"{path}." for path in adapted)  # an adapter layer's own parts (base, lora_A)
    matching = {name for name, _ in model.named_modules()
                if name and name.rpartition(".")[2] in leaves and not name.startswith(inside)}
    return sorted(leaves) if matching == set(adapted) else list(adapted)


def lora_scale(model: nn.Module) -> float:
    """The one ``s = alpha / rank`` of the model's adapter layers."""
    scales = {layer.scale for layer in lora_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"the adapter layers have {len(scales)} different scales "
                         f"{sorted(scales)}; a peft adapter has one")
    return scales.pop()


def peft_tensors(factors: Factors, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter and head tensors under peft's key names (contiguous CPU copies)."""
    tensors = {}
    for layer, (B, A) in factors.items():
        tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = B
    tensors.update({PEFT_PREFIX + key: value for key, value in head.items()})
    return {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}


def merged_weights(pretrained: dict[str, torch.Tensor], factors: Factors, scale: float,
                   base_delta: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``W0 + delta + s B A`` per adapted layer, in the pretrained weight's dtype and device."""
    base_delta = base_delta or {}
    merged = {}
    for layer, W0 in pretrained.items():
        B, A = (f.to(device=W0.device, dtype=W0.dtype) for f in factors[layer])
        weight = W0 + scale * (B @ A)
        if layer in base_delta:
            weight = weight + base_delta[layer].to(device=W0.device, dtype=W0.dtype)
        merged[layer] = weight
    return merged


def save_tokenizer(tokenizer, folder: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def write_adapter(bundle, factors: Factors, head: dict[str, torch.Tensor], folder: Path) -> Path:
    """``folder``: a peft LoRA adapter (config, safetensors weights) and the tokenizer."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    model = bundle.model
    ranks = {B.shape[1] for B, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"the exported factors have ranks {sorted(ranks)}; a peft adapter has one")
    rank = ranks.pop()
    heads = head_modules(bundle.head_keys)
    config = LoraConfig(r=rank, lora_alpha=lora_scale(model) * rank,
                        target_modules=target_modules(model, bundle.adapted),
                        modules_to_save=heads or None, task_type=task_type(model),
                        lora_dropout=0.0, bias="none", inference_mode=True,
                        base_model_name_or_path=getattr(getattr(model, "config", None),
                                                        "name_or_path", None) or None)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(peft_tensors(factors, head), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_tokenizer(bundle.tokenizer, folder)
    return folder


@torch.no_grad()
def write_merged(bundle, weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                 folder: Path) -> Path:
    """``folder``: the base model with ``weights`` in place of its adapter layers, and ``head``.

    The adapter layers are swapped for plain ``nn.Linear`` layers only while saving (and put
    back, whatever happens), so the server's model is left as it was."""
    model = bundle.model
    swapped = {}
    try:
        for layer, weight in weights.items():
            adapter = model.get_submodule(layer)
            plain = nn.Linear(adapter.base.in_features, adapter.base.out_features,
                              bias=adapter.base.bias is not None, device=weight.device,
                              dtype=weight.dtype)
            plain.weight.copy_(weight)
            if adapter.base.bias is not None:
                plain.bias.copy_(adapter.base.bias)
            parent_name, _, child = layer.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, plain)
            swapped[layer] = (parent, child, adapter)
        state = model.state_dict()
        state.update({key: value.to(state[key].device, state[key].dtype)
                      for key, value in head.items()})
        model.save_pretrained(folder, state_dict=state)
    finally:
        for parent, child, adapter in swapped.values():
            setattr(parent, child, adapter)
    save_tokenizer(bundle.tokenizer, folder)
    return folder


def export_adapter(bundle, factors: Factors, head: dict[str, torch.Tensor],
                   base_delta: dict[str, torch.Tensor] | None, out_dir: Path,
                   merged: bool) -> list[Path]:
    """Write the final model under ``out_dir``; returns the folders written.

    ``factors``: each adapted layer's plain-LoRA ``(B, A)``; ``head``: the head tensors by state
    key; ``base_delta``: what the method added to the pretrained base weights (None: nothing),
    which makes a merged model the only faithful export; ``merged``: write one anyway."""
    if set(factors) != set(bundle.adapted):
        raise ValueError(f"factors for {sorted(set(factors) ^ set(bundle.adapted))[:3]} do not "
                         "match the model's adapted layers")
    out_dir = Path(out_dir)
    written = []
    if base_delta is None:
        written.append(write_adapter(bundle, factors, head, out_dir / ADAPTER_DIR))
    if merged or base_delta is not None:
        if not hasattr(bundle.model, "save_pretrained"):
            log.warning("%s is not a Hugging Face model: no merged model written",
                        type(bundle.model).__name__)
            return written
        weights = merged_weights(bundle.pretrained_base, factors, lora_scale(bundle.model),
                                 base_delta)
        written.append(write_merged(bundle, weights, head, out_dir / MERGED_DIR))
    return written


def export_run(bundle, strategy, state: dict[str, torch.Tensor], out_dir: Path,
               merged: bool) -> list[Path]:
    """The run's final global ``state`` as the method exports it (``export_adapter``)."""
    head = {key: value for key, value in state.items() if key in bundle.head_keys}
    folders = export_adapter(bundle, strategy.export_factors(state), head,
                             strategy.global_base_delta(), out_dir, merged)
    for folder in folders:
        log.info("final model written to %s", folder)
    return folders
