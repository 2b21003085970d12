"""Record-level DP-SGD inside a batch of clients (docs/design/client-batching.md): each client's
step in a batched pass is its own DP-SGD step alone (per-example clipping over all its trained
tensors, noise from its own stream, its own expected batch size), and its accountant is its own.

Oracles: the one-node-per-client engine (Opacus wrapping the model, ``client_update``) on the
same messages (``tests.test_client_batching.TwinGrid``), and Opacus on one client alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

import fedlora.clients.app as client_app
import fedlora.model.pretrained as models
from fedlora.clients.batched import ClientSteps, RandomStream, train_together
from fedlora.clients.dp import ClientPrivacy
from fedlora.clients.train import client_update
from fedlora.model.adapters import part_of
from fedlora.privacy.randomness import KeyStream
from tests.test_client_batching import (  # noqa: F401 (fixtures)
    assert_same_rows_up_to_tolerance, bert_folder, dropout_llama_folder, float64_clients,
    hosted_grid, rows_of, serve, sft_run_config, topic_config, twin_run)
from tests.test_generation_federation import ClientAppGrid, sft_data  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("flower_task")

# Record-level DP on the tiny BERT's clients of ~15 examples: Poisson batches of about 3, so
# batch sizes differ inside a chunk and some are empty (a noise-only step).
RECORD_DP = {"dp": {"epsilon": 8.0, "clip": 0.5}, "batch_size": 3}


@pytest.fixture
def chunks(monkeypatch):
    """Every chunk ``train_together`` trains: its clients' steps (a spy, which then trains)."""
    seen: list[list[ClientSteps]] = []

    def spy(model, head_keys, trained_keys, clients, *args, **kwargs):
        seen.append(list(clients))
        return train_together(model, head_keys, trained_keys, clients, *args, **kwargs)

    monkeypatch.setattr(client_app, "train_together", spy)
    return seen


def assert_private_chunks_of_several(chunks: list[list[ClientSteps]], empty_step: bool = True):
    """DP clients were trained several to a pass (not alone), some with an empty Poisson batch."""
    assert chunks and all(c.privacy is not None for chunk in chunks for c in chunk)
    assert max(len(chunk) for chunk in chunks) > 1
    if empty_step:
        assert any(s is None for chunk in chunks for c in chunk for s in c.steps)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_batched_record_level_dp_equals_one_client_at_a_time_in_float64(
        strategy, bert_folder, float64_clients, chunks, tmp_path, caplog):
    # Execute: 6 sampled clients a round on 2 hosts, 3 at a time; reproducible noise (a
    # simulation's), which both engines draw from each client's own seed
    cfg = topic_config(strategy, bert_folder, **RECORD_DP)
    twin = twin_run(cfg, tmp_path, hosts=2, client_batch=3, caplog=caplog)

    # Assert: every reply within 1e-10, its DP metrics (epsilon, history) equal
    assert_private_chunks_of_several(chunks)
    assert twin.compared >= 12
    assert max(twin.differences) <= 1e-10


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_batched_record_level_dp_equals_one_client_at_a_time_in_float64_causal_lm(
        strategy, dropout_llama_folder, sft_data, float64_clients, chunks, tmp_path, caplog):
    # Execute: all 4 clients in one pass
    cfg = sft_run_config(strategy, dropout_llama_folder, sft_data, dp={"epsilon": 8.0, "clip": 0.02},
                         batch_size=1)
    twin = twin_run(cfg, tmp_path, hosts=1, client_batch=4, caplog=caplog)

    # Assert
    assert_private_chunks_of_several(chunks)
    assert twin.compared >= 8
    assert max(twin.differences) <= 1e-10


# --------------------------------------------------------------------------------------------
# One client's noise and update, whichever clients share its pass (secret noise)


@pytest.fixture(scope="module")
def tiny_bert(bert_folder):
    """The tiny BERT in float64, its tokenised training examples and its task."""
    cfg = topic_config("fedavg", bert_folder)
    task = cfg.task_spec()
    bundle = models.build_model(cfg.model_spec(len(task.dataset().label_names)))
    bundle.model.double()
    bundle.initial_state = {k: v.double() for k, v in bundle.initial_state.items()}
    return bundle, task.training_examples(bundle.tokenizer, cfg.max_length), task


PARTS = ("A", "B", "head")
LR, HEAD_LR, CLIP = 0.05, 0.1, 0.3
# Per client: its Poisson samples (None: empty), sigma_k and expected batch size (both differ
# by n_k), and its node's noise key. Client 0 meets every other client in some pass.
CLIENTS = {0: ([[0, 1, 2], None, [3]], 1.1, 3, b"\x00" * 32),
           1: ([[10], [11, 12, 13, 14], [15, 16]], 0.9, 2, b"\x01" * 32),
           2: ([[20, 21], [22], None], 1.3, 4, b"\x02" * 32),
           3: ([[30, 31, 32, 33], [34, 35], [36]], 0.7, 3, b"\x03" * 32)}


@dataclass
class RecordedPrivacy(ClientPrivacy):
    """A client's privacy that keeps the noised gradients its optimiser receives, step by step
    (alone: what Opacus' optimiser hands AdamW; batched: ``noised_gradient``)."""

    recorded: list[list[torch.Tensor]] = field(default_factory=list)

    @contextmanager
    def wrap(self, model, optimizer):
        with super().wrap(model, optimizer) as (wrapped, dp_optimizer):
            inner = dp_optimizer.original_optimizer.step

            def step(*args, **kwargs):
                self.recorded.append([p.grad.clone() for p in dp_optimizer.params])
                return inner(*args, **kwargs)

            dp_optimizer.original_optimizer.step = step
            yield wrapped, dp_optimizer

    def noised_gradient(self, per_example):
        noised = super().noised_gradient(per_example)
        self.recorded.append([g.clone() for g in noised])
        return noised


def client_privacy(client: int, key: bytes | None = None) -> RecordedPrivacy:
    _, sigma, expected, own_key = CLIENTS[client]
    return RecordedPrivacy(target_epsilon=8.0, delta=1e-5, clip=CLIP, accountant="rdp",
                           noise_multiplier=sigma, sample_rate=0.2, batch_size=expected,
                           noise_generator=KeyStream(key or own_key))


def client_start(bundle, client: int) -> dict[str, torch.Tensor]:
    """A start state of its own (B nonzero, so every factor has a gradient)."""
    generator = torch.Generator().manual_seed(100 + client)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
            for k, v in bundle.initial_state.items()}


def trained_alone_by_opacus(tiny_bert, client: int, key: bytes | None = None):
    """The oracle: the client's local round alone, Opacus wrapping the model (``client_update``)."""
    bundle, batches, task = tiny_bert
    steps = CLIENTS[client][0]
    bundle.load(client_start(bundle, client))
    trainable = bundle.set_trainable(PARTS)
    head = [p for k, p in bundle.model.named_parameters() if p.requires_grad and k in bundle.head_keys]
    privacy = client_privacy(client, key)
    torch.manual_seed(client)  # its dropout masks
    client_update(bundle.model, trainable, (None if s is None else batches.collate(s) for s in steps),
                  LR, privacy=privacy, loss=task.loss, head=head, head_lr=HEAD_LR)
    return bundle.state(PARTS), privacy.recorded


def trained_together(tiny_bert, clients: list[int]):
    """The clients' local rounds in one pass per step; each one's state and noised gradients."""
    bundle, batches, task = tiny_bert
    chunk = []
    for client in clients:
        torch.manual_seed(client)
        chunk.append(ClientSteps(client_start(bundle, client), CLIENTS[client][0], LR, HEAD_LR,
                                 RandomStream.capture("cpu"), privacy=client_privacy(client)))
    trained_keys = [k for k in bundle.shapes() if part_of(k, bundle.head_keys) in PARTS]
    states = train_together(bundle.model, bundle.head_keys, trained_keys, chunk, batches, task.loss)
    return {client: (state, steps.privacy.recorded)
            for client, state, steps in zip(clients, states, chunk)}


def largest_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert sorted(first) == sorted(second)
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_a_clients_noise_and_update_are_its_own_whichever_clients_share_its_pass(tiny_bert):
    # Prepare: client 0 alone (Opacus), and with another key (how much its noise moves it)
    alone, alone_noised = trained_alone_by_opacus(tiny_bert, 0)
    other_noise, _ = trained_alone_by_opacus(tiny_bert, 0, key=b"\x09" * 32)

    # Execute: client 0 in passes with different partners (and alone in one)
    runs = [trained_together(tiny_bert, partners) for partners in ([0], [0, 1], [2, 0, 3], [3, 1, 0, 2])]

    # Assert: the noise is in the update (a key changes it), and client 0's noised gradients and
    # update are the same in every pass, equal to Opacus alone; so are its partners'
    assert largest_difference(alone, other_noise) > 1e-3
    for run in runs:
        state, noised = run[0]
        assert largest_difference(state, alone) <= 1e-10
        assert len(noised) == len(alone_noised) == 3
        for got, expected in zip(noised, alone_noised):
            assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= 1e-10
    for client in (1, 2, 3):
        expected, _ = trained_alone_by_opacus(tiny_bert, client)
        assert largest_difference(runs[-1][client][0], expected) <= 1e-10


# --------------------------------------------------------------------------------------------
# Accounting


def test_a_batched_dp_run_reports_the_epsilon_of_the_unbatched_run(bert_folder, chunks, tmp_path):
    # Prepare: float32, the default precision's tolerances
    cfg = topic_config("fedavg", bert_folder, **RECORD_DP)
    batched = topic_config("fedavg", bert_folder, client_batch=3, **RECORD_DP)

    # Execute
    serve(ClientAppGrid(cfg.clients), cfg, tmp_path / "nodes")
    serve(hosted_grid(batched, 2, 3), batched, tmp_path / "batched")

    # Assert: the same epsilon (and counts, bytes) every round; losses within the tolerance
    assert_private_chunks_of_several(chunks)
    nodes, hosted = rows_of(tmp_path / "nodes"), rows_of(tmp_path / "batched")
    assert nodes[-1]["epsilon"] > 0 and [r["epsilon"] for r in nodes] == [r["epsilon"] for r in hosted]
    test_size = len(cfg.task_spec().dataset().test.labels)
    assert_same_rows_up_to_tolerance(nodes, hosted, test_size)
    assert (tmp_path / "nodes" / "privacy.json").read_text() == \
        (tmp_path / "batched" / "privacy.json").read_text()
