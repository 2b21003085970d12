"""Several clients' local rounds at once: one pass through one copy of the base model per step.

``train_together`` is ``fedlora.clients.train.client_update`` for K clients that train with the
same settings (parts, optimiser, learning rates, number of steps, base weights) but each on its
own data, from its own adapter state (docs/design/client-batching.md). Step s stacks the K
clients' batches of step s into one batch, client k's rows forming block k:

* every block has as many rows as the largest of the K batches; a shorter batch is topped up
  with copies of its first example, whose loss weighs nothing; the batch is the task's own
  ``collate`` of all rows (right-padded to the longest example of the chunk), and client k's
  rows, cut to the length of its own batch, are checked to be exactly its own batch;
* each adapted layer and head Linear uses client k's factors for block k (stacked ``[K, ...]``,
  ``fedlora.model.stacked``);
* the loss is the sum over clients of each client's own mean loss (the mean of
  ``loss(model, batch, "none")`` over its real rows), so the gradient of client k's factors is exactly the
  gradient of its own mean loss;
* the optimiser holds the stacked tensors: AdamW's and SGD's steps are elementwise, so each
  client's slice moves exactly as its own optimiser would move it;
* dropout is drawn client by client (``ClientRandomness``): client k's block, cut to its own
  batch's shape, from client k's own random stream (the torch RNG state it would have had
  training alone), so its masks are the very masks it draws alone; repeated rows and padding
  draw nothing;
* under record-level DP (``ClientSteps.privacy``) a step is each client's DP-SGD step alone
  (``private_step``): per-example gradients, clipped, summed and noised from the client's own
  source, divided by its own expected batch size, as Opacus does it for the client alone.

So a chunk's clients end their round with the tensors they would have trained one at a time,
to floating-point rounding (tests: float64, 1e-10).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fedlora.clients.train import OPTIMIZERS
from fedlora.model.pretrained import autocast
from fedlora.model.stacked import stacked_clients, stacked_keys


@dataclass
class RandomStream:
    """A client's torch RNG state (CPU, and CUDA where the model is): the state its own
    ``torch.manual_seed`` left, advanced only by its own draws."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: str) -> "RandomStream":
        """The process's RNG state now (where a client's local steps would begin)."""
        cuda = torch.cuda.get_rng_state() if str(device).startswith("cuda") else None
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def active(self):
        """The process's RNG set to this stream for the block, and the stream advanced by
        what the block drew; the process's own state comes back afterwards."""
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


@dataclass
class ClientSteps:
    """One client's part of a batched round: the full adapter and head state it trains from,
    the example indices of each of its local steps, its learning rates and random stream."""

    start: dict[str, torch.Tensor]
    steps: list[list[int] | None]  # None: an empty Poisson batch (DP only)
    lr: float
    head_lr: float
    stream: RandomStream
    losses: list[float] = field(default_factory=list)
    # None, or what makes its steps DP-SGD (``fedlora.clients.dp.ClientPrivacy``: its
    # ``noised_gradient``); passed in, so this module depends on no DP code
    privacy: object | None = None


@dataclass
class Block:
    """Where a client's rows are in a step's batch: rows ``first .. first + rows``, its own
    batch ``length`` positions long; ``stream`` its randomness."""

    first: int
    rows: int
    length: int
    stream: RandomStream


_DROPOUT = inspect.signature(F.dropout)
_ATTENTION_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                   "enable_gqa")
# Random functions this module does not split by client: refused in a batched pass.
_UNSPLIT_RANDOM = {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                   F.feature_alpha_dropout, torch.dropout, torch.bernoulli, torch.rand_like,
                   torch.randn_like, torch.rand, torch.randn, torch.randint, torch.randperm,
                   torch.multinomial, torch.normal}


class ClientRandomness(TorchFunctionMode):
    """Dropout in a batched forward pass, drawn block by block from each client's stream in the
    shape of the client's own batch (``F.dropout`` on [rows, ...], [rows, positions, ...] and
    [rows, heads, positions, positions] tensors; ``F.scaled_dot_product_attention`` with
    ``dropout_p`` > 0). Positions beyond a client's own length and repeated rows draw nothing
    and are not dropped: nothing real reads them.

    On the CPU a client's noise is drawn as ``F.dropout`` draws it (``bernoulli(1 - p) / (1 - p)``
    in the shape of its own batch) into one noise tensor for the whole batch, and attention is
    PyTorch's CPU math kernel written out (``math_attention``) with that noise: one pass for all
    clients, the very numbers of each client alone. On CUDA (fused dropout kernels) each
    client's block is computed by its own call."""

    def __init__(self, blocks: list[Block], length: int, total_rows: int):
        super().__init__()
        self.blocks, self.length, self.total_rows = blocks, length, total_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            bound = _DROPOUT.bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["training"] and bound.arguments["p"] > 0:
                return self.dropout(bound.arguments["input"], bound.arguments["p"])
        elif func is F.scaled_dot_product_attention:
            named = {**dict(zip(_ATTENTION_ARGS, args)), **kwargs}
            if named.get("dropout_p", 0.0) > 0:
                return self.attention(**named)
        elif func in _UNSPLIT_RANDOM:
            raise RuntimeError(f"{getattr(func, '__name__', func)} draws random numbers in a "
                               "batched pass of several clients, which only splits dropout by "
                               "client; set client_batch=1")
        return func(*args, **kwargs)

    def _positions(self, x: torch.Tensor, block: Block) -> tuple:
        """The index of client ``block``'s own batch in ``x`` (rows, then its own length on
        the position dimensions of a [rows, positions, ...] or [rows, heads, q, k] tensor)."""
        rows = slice(block.first, block.first + block.rows)
        if x.dim() <= 2:
            return (rows,)
        cut = slice(0, block.length)
        dims = (1,) if x.dim() == 3 else (2, 3) if x.dim() == 4 else None
        if dims is None or any(x.shape[d] != self.length for d in dims):
            raise RuntimeError(f"dropout on a tensor of shape {tuple(x.shape)} in a batched pass "
                               "of several clients: its position dimensions are not known; set "
                               "client_batch=1")
        return (rows, cut) if dims == (1,) else (rows, slice(None), cut, cut)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if x.shape[0] != self.total_rows:
            raise RuntimeError(f"dropout on a tensor of {x.shape[0]} rows in a batched pass of "
                               f"{self.total_rows} rows; set client_batch=1")
        if x.device.type != "cpu":  # CUDA's fused kernel: each client's own call
            out = x.clone()
            for block in self.blocks:
                index = self._positions(x, block)
                with block.stream.active():
                    out[index] = F.dropout(x[index], p, True)
            return out
        # CPU: F.dropout is ``x * (bernoulli(1 - p) / (1 - p))`` with the noise drawn in x's
        # shape; so each client's noise, drawn in its own shape, and one product
        noise = torch.ones_like(x)
        for block in self.blocks:
            index = self._positions(x, block)
            with block.stream.active():
                noise[index] = _dropout_noise(noise[index].shape, p, x.dtype)
        return x * noise

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False) -> torch.Tensor:
        if query.device.type == "cpu":  # CPU's math kernel, with each client's noise
            heads, positions = query.shape[-3], query.shape[-2]
            noise = query.new_ones(query.shape[0], heads, positions, key.shape[-2])
            for block in self.blocks:
                index = self._positions(noise, block)
                with block.stream.active():
                    noise[index] = _dropout_noise(noise[index].shape, dropout_p, query.dtype)
            return math_attention(query, key, value, attn_mask, noise, is_causal, scale, enable_gqa)
        out = query.new_zeros(*query.shape[:-1], value.shape[-1])  # CUDA: client by client
        for block in self.blocks:
            rows = slice(block.first, block.first + block.rows)
            cut = slice(0, block.length)
            mask = None
            if attn_mask is not None:  # [rows or 1, heads or 1, q, k]: cut what is not broadcast
                mask = attn_mask[rows if attn_mask.shape[0] > 1 else slice(None), :,
                                 cut if attn_mask.shape[2] > 1 else slice(None), cut]
            with block.stream.active():
                out[rows, :, cut] = F.scaled_dot_product_attention(
                    query[rows, :, cut], key[rows, :, cut], value[rows, :, cut], attn_mask=mask,
                    dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return out


def _dropout_noise(shape, p: float, dtype) -> torch.Tensor:
    """What ``F.dropout`` multiplies a CPU tensor of ``shape`` by, from the current RNG."""
    return torch.empty(shape, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


def math_attention(query, key, value, attn_mask, noise, is_causal: bool, scale, enable_gqa: bool):
    """``F.scaled_dot_product_attention`` as PyTorch's CPU math kernel computes it with
    dropout (the kernel it uses when ``dropout_p`` > 0), the attention probabilities times
    ``noise`` (the dropout noise: 0 or 1 / (1 - p)): the kernel's operations in its order."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    root = math.sqrt(scale)
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                               device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device
                                ).masked_fill(attn_mask.logical_not(), float("-inf"))
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    attn = torch.matmul(query * root, key.transpose(-2, -1) * root)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = torch._safe_softmax(attn, -1)
    return torch.matmul(attn * noise, value)


def _batch_length(batch: dict[str, torch.Tensor]) -> int:
    """The positions of a collated batch (its 2-D tensors' second dimension)."""
    return max(v.shape[1] for v in batch.values() if v.dim() >= 2)


def chunk_batch(batches, indices: list[list[int]]) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """One step's batch of a chunk: each client's examples, topped up to the largest count with
    copies of its first, collated by the task (``batches.collate``) in client order. Returns
    the batch, each client's number of real rows and each client's own batch length. A
    client's real rows, cut to its own length, must equal its own batch (right padding, row by
    row): a task that pads otherwise cannot be batched."""
    most = max(len(rows) for rows in indices)
    padded = [rows + [rows[0]] * (most - len(rows)) for rows in indices]
    batch = batches.collate([i for rows in padded for i in rows])
    lengths = []
    for k, rows in enumerate(indices):
        own = batches.collate(rows)
        length = _batch_length(own)
        lengths.append(length)
        for key, value in own.items():
            part = batch[key][k * most:k * most + len(rows)]
            if value.dim() >= 2:
                part = part[:, :length]
            if not torch.equal(part, value):
                raise RuntimeError(f"the task's batches do not pad row by row on the right "
                                   f"('{key}' of a client differs inside a chunk); set "
                                   "client_batch=1")
    return batch, [len(rows) for rows in indices], lengths


def train_together(model: torch.nn.Module, head_keys, trained_keys: list[str],
                   clients: list[ClientSteps], batches, loss, optimizer: str = "adamw",
                   device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """The local rounds of ``clients`` (same trained keys, optimiser and number of steps) in one
    pass per step; each client's trained tensors (``trained_keys``) at the end, and its per-step
    mean losses appended to ``ClientSteps.losses``.

    ``model``: the shared model, its base weights already those every client trains on;
    ``loss``: the task's ``(model, batch, reduction)``; ``trained_keys``: the state keys of the
    trained parts (adapter factors and head), in the model's order."""
    count = len(clients)
    if len({len(c.steps) for c in clients}) != 1:
        raise ValueError("clients trained together must take the same number of steps")
    if len({c.privacy is None for c in clients}) != 1:
        raise ValueError("clients trained together must all train with DP-SGD or all without")
    head = set(head_keys)
    stacks, trainable = {}, {}
    own = model.state_dict()
    for key in stacked_keys(model, head_keys):  # in the model's dtype, as ``load`` copies them
        stacked = torch.stack([c.start[key] for c in clients]).to(device=device, dtype=own[key].dtype)
        if key in trained_keys:
            stacked = torch.nn.Parameter(stacked)
            trainable[key] = stacked
        stacks[key] = stacked
    # one parameter group per learning rate, as client_update (each client's lr: the same)
    groups = [{"params": [p for k, p in trainable.items() if k not in head], "lr": clients[0].lr},
              {"params": [p for k, p in trainable.items() if k in head], "lr": clients[0].head_lr}]
    step_optimizer = OPTIMIZERS[optimizer]([g for g in groups if g["params"]], clients[0].lr)
    precision = autocast(model)
    model.train()
    if clients[0].privacy is not None:
        # the order of each client's optimiser alone (``client_update``'s groups), in which
        # its noise is drawn
        order = [k for k in trained_keys if k not in head] + [k for k in trained_keys if k in head]
        for step in range(len(clients[0].steps)):
            private_step(model, head_keys, stacks, trainable, order, clients, step, batches, loss,
                         precision, device)
            step_optimizer.step()
            step_optimizer.zero_grad(set_to_none=True)
        return [{key: trainable[key][k].detach().cpu().clone() for key in trained_keys}
                for k in range(count)]
    with stacked_clients(model, head_keys, stacks):
        for step in range(len(clients[0].steps)):
            batch, real, lengths = chunk_batch(batches, [c.steps[step] for c in clients])
            batch = {k: v.to(device) for k, v in batch.items()}
            most = max(real)
            blocks = [Block(k * most, rows, length, c.stream)
                      for k, (rows, length, c) in enumerate(zip(real, lengths, clients))]
            with precision, ClientRandomness(blocks, _batch_length(batch), count * most):
                per_example = loss(model, batch, "none")
                means = torch.stack([per_example[b.first:b.first + b.rows].mean() for b in blocks])
                means.sum().backward()
            step_optimizer.step()
            step_optimizer.zero_grad(set_to_none=True)
            for client, value in zip(clients, means.detach().tolist()):
                client.losses.append(value)
    return [{key: trainable[key][k].detach().cpu().clone() for key in trained_keys}
            for k in range(count)]


def private_step(model: torch.nn.Module, head_keys, stacks: dict[str, torch.Tensor],
                 trainable: dict[str, torch.nn.Parameter], order: list[str],
                 clients: list[ClientSteps], step: int, batches, loss, precision,
                 device: str) -> None:
    """Step ``step`` of DP-SGD for every client of the chunk: each stacked trained tensor's
    ``.grad`` set, slice k to client k's noised gradient (``ClientPrivacy.noised_gradient``),
    exactly what its own DP-SGD step alone would give its optimiser.

    Per-example gradients from one pass: each example's rows get their own copy of its
    client's factors and head (stacked ``[examples, ...]``, example-major within each client's
    block, which ``fedlora.model.stacked`` computes as it computes clients), so the gradient of
    the summed per-example losses with respect to copy i is example i's own gradient (what
    Opacus' hooks compute for a client alone). Rows that only top up a block carry no loss, so
    their copies' gradients are dropped. A client whose Poisson batch is empty has no rows (its
    forward pass draws no dropout, as alone) and takes the noise-only step. Each client's noise
    is drawn from its own source (a torch generator: its own random stream), in its own
    optimiser's order and shapes: no other client of the chunk changes it."""
    present = [k for k, client in enumerate(clients) if client.steps[step]]
    per_example = [{key: trainable[key].new_zeros((0, *trainable[key].shape[1:])) for key in order}
                   for _ in clients]
    if present:
        batch, real, lengths = chunk_batch(batches, [clients[k].steps[step] for k in present])
        batch = {k: v.to(device) for k, v in batch.items()}
        most = max(real)
        copies = {}
        for key, stacked in stacks.items():  # each client's tensors, once per row of its block
            copies[key] = stacked.detach()[present].repeat_interleave(most, dim=0)
            if key in trainable:
                copies[key].requires_grad_(True)
        blocks = [Block(position * most, rows, length, clients[k].stream)
                  for position, (k, rows, length) in enumerate(zip(present, real, lengths))]
        with stacked_clients(model, head_keys, copies), precision, \
                ClientRandomness(blocks, _batch_length(batch), len(present) * most):
            per_row = loss(model, batch, "none")
            own = [per_row[b.first:b.first + b.rows] for b in blocks]
            grads = torch.autograd.grad(torch.stack([rows.sum() for rows in own]).sum(),
                                        [copies[key] for key in order])
        for position, (k, block) in enumerate(zip(present, blocks)):
            clients[k].losses.append(own[position].detach().mean().item())
            for key, grad in zip(order, grads):
                per_example[k][key] = grad[block.first:block.first + block.rows]
    noised = []
    for client, own_examples in zip(clients, per_example):
        with client.stream.active():  # a torch generator's noise: the client's own stream
            noised.append(client.privacy.noised_gradient([own_examples[key] for key in order]))
    for j, key in enumerate(order):
        trainable[key].grad = torch.stack([gradients[j] for gradients in noised])
