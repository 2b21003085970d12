"""What a client computes locally: a few optimiser steps on its data, or a gradient sum.

Plain PyTorch on purpose: the model and optimiser are what Opacus wraps, so DP-SGD
(``dp=...``, ``fedlora.clients.dp``) runs this same loop on the wrapped pair.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from fedlora.model.pretrained import autocast


def model_loss(model: torch.nn.Module):
    """The loss ``(model, batch, reduction) -> tensor`` the model is trained on: its task's
    (``fedlora.tasks.Task.loss``, attached by ``fedlora.model.pretrained.build_model``), else, for a model
    built elsewhere, cross-entropy of its logits against the batch's labels."""
    return getattr(model, "task_loss", None) or logits_cross_entropy


def logits_cross_entropy(model: torch.nn.Module, batch: dict, reduction: str = "mean"):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)


OPTIMIZERS = {"adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
              "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr)}


def client_update(model: torch.nn.Module, trainable: list[torch.nn.Parameter], batches,
                  lr: float, device: str = "cpu", privacy=None, loss=None,
                  optimizer: str = "adamw", head=(), head_lr: float | None = None) -> dict[str, float]:
    """``optimizer`` (AdamW or plain SGD) on ``trainable`` over every batch of ``batches``; a
    fresh optimiser each round. ``head``: the trainable parameters that step at ``head_lr``
    instead of ``lr`` (a classifier's new head; one parameter group each).

    ``loss``: ``(model, batch, reduction)`` (default ``model_loss(model)``), called with the
    mean reduction on the (possibly Opacus-wrapped) model.

    ``privacy``: None, or what makes the loop DP-SGD (``fedlora.clients.dp.ClientPrivacy``):
    ``privacy.wrap(model, optimizer)``, a context manager giving the wrapped pair (per-example
    clipping and noise), and ``privacy.empty_step(optimizer, trainable)`` for a ``None`` batch
    (``batches`` are then Poisson samples, where None is an empty one). Passed in, not
    imported, so this loop depends on no DP code."""
    loss_of = loss or model_loss(model)  # looked up before Opacus wraps the model
    precision = autocast(model)  # precision=bf16: autocast around forward and backward
    head_ids = {id(param) for param in head}
    groups = [{"params": [p for p in trainable if id(p) not in head_ids], "lr": lr},
              {"params": [p for p in trainable if id(p) in head_ids],
               "lr": lr if head_lr is None else head_lr}]
    optimizer = OPTIMIZERS[optimizer]([group for group in groups if group["params"]], lr)
    model.train()  # before wrapping: Opacus computes per-example gradients in train mode
    wrapping = nullcontext((model, optimizer)) if privacy is None else privacy.wrap(model, optimizer)
    losses, steps = [], 0
    with wrapping as (model, optimizer):
        for batch in batches:
            steps += 1
            if batch is None:  # an empty Poisson batch (DP only): a noise-only step
                privacy.empty_step(optimizer, trainable)
                optimizer.zero_grad(set_to_none=True)
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision:
                batch_loss = loss_of(model, batch, "mean")
                batch_loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(batch_loss.item())
    return {"train_loss": sum(losses) / max(len(losses), 1), "steps": steps}


def base_gradient_sum(model: torch.nn.Module, weights: dict[str, torch.nn.Parameter], batches,
                      device: str = "cpu", loss=None) -> dict[str, torch.Tensor]:
    """``sum_i grad_W loss_i`` over every example of ``batches`` for each frozen base weight W,
    ``loss_i`` the task's per-example loss (``loss``, default ``model_loss(model)``, with the
    sum reduction).

    A sum (not a mean) so that sums over clients equal the sum over their pooled examples;
    computed in eval mode, since dropout's random masks would break that equality.
    The weights are made trainable only for this pass and frozen again afterwards.
    """
    was_training = model.training
    model.eval()
    loss_of = loss or model_loss(model)
    packed = [key for key, w in weights.items() if not w.is_floating_point()]
    if packed:  # bitsandbytes 4-bit weights have no gradient of their own
        raise ValueError(f"{packed[0]} is quantised (quantization=4): the method needs gradients "
                         "of the base weights; set quantization=null")
    sums = {key: torch.zeros_like(w, device="cpu") for key, w in weights.items()}
    params = list(weights.values())
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            summed = loss_of(model, batch, "sum")
            for (key, _), grad in zip(weights.items(), torch.autograd.grad(summed, params)):
                sums[key] += grad.detach().cpu()
    finally:
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    return sums
