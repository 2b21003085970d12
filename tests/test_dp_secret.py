"""Secret DP randomness, end to end through the ClientApp's handlers on the real model.

The server's attack (issue 11): replay a client's Poisson sample and Gaussian noise from what
the server knows, (seed, round, partition id), with fedlora's own code. Its replay is the
client run in reproducible mode on the same message: in secret mode the client must give
neither that sample nor that update, and two fresh nodes answering the same message must
differ (their noise is their own); in reproducible mode, two fresh nodes give the same reply
bit for bit. Oracles: the replayed sample (``dp_rng`` in reproducible mode, drawn as the client
draws it) and the replies themselves."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.model import pretrained as models
from fedlora.model.adapters import part_of
from fedlora.clients import app as client_app
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig, client_config, resolve_noise
from fedlora.privacy.randomness import dp_rng
from fedlora.core.errors import ConfigError
from fedlora.strategies import get_strategy

NUM_LABELS = 21
PARTITION, ROUND, SEED = 1, 3, 0


def dp_cfg(strategy: str, deployment: bool, **dp) -> RunConfig:
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 4, "clients_per_round": 4,
                               "rank": 2, "seed": SEED, "local_steps": 2, "batch_size": 4,
                               "max_length": 16, "rounds": 3, "dp": {"epsilon": 8.0, **dp}})
    return resolve_noise(cfg, deployment=deployment)


def fresh_context() -> Context:
    return Context(run_id=1, node_id=10 + PARTITION, state=RecordDict(), run_config={},
                   node_config={"partition-id": PARTITION, "num-partitions": 4})


def train_message(cfg: RunConfig, bundle) -> Message:
    """The server's train message to partition ``PARTITION`` in round ``ROUND``."""
    server = get_strategy(cfg.strategy).from_config(cfg, bundle.head_keys)
    server.register_nodes({10 + p: p for p in range(4)})
    messages = server.configure_train(ROUND, ArrayRecord(bundle.initial_state),
                                      ConfigRecord(client_config(cfg, NUM_LABELS)), None)
    return next(m for m in messages if m.metadata.dst_node_id == 10 + PARTITION)


def setup_message(cfg: RunConfig, bundle) -> Message:
    head = {k: v for k, v in bundle.initial_state.items() if part_of(k, bundle.head_keys) == "head"}
    config = {**client_config(cfg, NUM_LABELS), "server-round": 0, "init-samples": 40}
    return Message(content=RecordDict({"arrays": ArrayRecord(head), "config": ConfigRecord(config)}),
                   dst_node_id=10 + PARTITION, message_type=SETUP_MESSAGE_TYPE)


def arrays_of(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    return reply.content["arrays"].to_torch_state_dict()


def equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def sampled(monkeypatch):
    """Every Poisson sample the train handler draws (the examples of each step)."""
    samples: list[list[list[int]]] = []

    def recording(batches, indices, rate, steps, rng):
        drawn = []
        samples.append(drawn)
        for _ in range(steps):
            chosen = [i for i in indices if rng.random() < rate]
            drawn.append(chosen)
            yield batches.collate(chosen) if chosen else None

    monkeypatch.setattr(client_app, "poisson_batches", recording)
    return samples


@pytest.mark.usefixtures("flower_task")
def test_the_server_cannot_replay_a_secret_training_round(sampled):
    # Prepare: the same train message, in deployment (secret) and simulation (reproducible)
    secret_cfg = dp_cfg("fedavg", deployment=True)
    replay_cfg = dp_cfg("fedavg", deployment=False)
    bundle = models.cached_model(secret_cfg.model_spec(NUM_LABELS))
    secret_message = train_message(secret_cfg, bundle)
    replay_message = train_message(replay_cfg, bundle)
    assert secret_message.content["config"]["dp-noise"] == "secret"
    assert replay_message.content["config"]["dp-noise"] == "reproducible"
    indices = client_app.ClientSetup(replay_message, fresh_context()).indices
    rate = min(1.0, 4 / len(indices))

    # Execute: two fresh nodes answer the secret message, two the reproducible one; the
    # server replays the sample from (seed, round, partition id) with fedlora's own dp_rng
    secret = [arrays_of(client_app.train(secret_message, fresh_context())) for _ in range(2)]
    replayed = [arrays_of(client_app.train(replay_message, fresh_context())) for _ in range(2)]
    server_rng = dp_rng("reproducible", "poisson", seed=SEED, server_round=ROUND,
                        partition_id=PARTITION)
    servers_sample = [[i for i in indices if server_rng.random() < rate] for _ in range(2)]

    # Assert: reproducible mode is the server's replay, bit for bit; secret mode is neither
    assert 0 < rate < 1
    secret_samples, replay_samples = sampled[:2], sampled[2:]
    assert replay_samples[0] == replay_samples[1] == servers_sample
    assert all(sample != servers_sample for sample in secret_samples)
    assert secret_samples[0] != secret_samples[1]
    assert equal(replayed[0], replayed[1])
    assert not equal(secret[0], replayed[0]) and not equal(secret[1], replayed[0])
    assert not equal(secret[0], secret[1])
    for key in secret[0]:  # no tensor of a secret reply is the replay's
        assert not torch.equal(secret[0][key], replayed[0][key]), key


@pytest.mark.usefixtures("flower_task")
def test_the_server_cannot_replay_fedsbs_secret_init_release():
    # Prepare
    secret_cfg = dp_cfg("fedsb", deployment=True)
    replay_cfg = dp_cfg("fedsb", deployment=False)
    bundle = models.cached_model(secret_cfg.model_spec(NUM_LABELS))

    # Execute: the set-up message answered by two fresh nodes in each mode
    secret_replies = [client_app.setup(setup_message(secret_cfg, bundle), fresh_context())
                      for _ in range(2)]
    secret = [arrays_of(reply) for reply in secret_replies]
    replayed = [arrays_of(client_app.setup(setup_message(replay_cfg, bundle), fresh_context()))
                for _ in range(2)]

    # Assert: the reproducible release is replayable; a secret one is neither it nor repeatable
    assert equal(replayed[0], replayed[1])
    for key in secret[0]:
        assert not torch.equal(secret[0][key], replayed[0][key]), key
        assert not torch.equal(secret[0][key], secret[1][key]), key
    # ...and two secret releases differ by at least two independent N(0, (sigma C)^2) draws
    # (their samples differ too, which only adds to the spread): real noise, not a glitch
    sigma = float(secret_replies[0].content["metrics"]["dp-noise-multiplier"])
    key = next(iter(secret[0]))
    spread = (secret[0][key] - secret[1][key]).std().item()
    assert spread >= 0.9 * 2 ** 0.5 * sigma * secret_cfg.dp.clip


@pytest.mark.usefixtures("flower_task")
def test_secure_rng_draws_secret_noise_even_in_simulation():
    # Prepare
    cfg = dp_cfg("fedavg", deployment=False, secure_rng=True)
    bundle = models.cached_model(cfg.model_spec(NUM_LABELS))
    message = train_message(cfg, bundle)

    # Execute
    first = arrays_of(client_app.train(message, fresh_context()))
    second = arrays_of(client_app.train(message, fresh_context()))

    # Assert
    assert cfg.dp.noise == "secret" and message.content["config"]["dp-noise"] == "secret"
    assert not equal(first, second)


def test_noise_mode_resolution_by_launcher():
    # Prepare
    base = RunConfig.from_dict({"strategy": "fedavg", "dp": {"epsilon": 3}})
    explicit = RunConfig.from_dict({"strategy": "fedavg",
                                    "dp": {"epsilon": 3, "reproducible_noise": True}})
    secure = RunConfig.from_dict({"strategy": "fedavg", "dp": {"epsilon": 3, "secure_rng": True}})

    # Execute / Assert: null is reproducible only in simulation; true is kept everywhere
    assert base.dp.noise == "secret"  # unresolved: the safe mode
    assert resolve_noise(base, deployment=False).dp.noise == "reproducible"
    assert resolve_noise(base, deployment=True).dp.noise == "secret"
    assert resolve_noise(explicit, deployment=True).dp.noise == "reproducible"
    assert resolve_noise(secure, deployment=False).dp.noise == "secret"
    resolved = resolve_noise(base, deployment=True)
    assert resolve_noise(resolved, deployment=False) == resolved  # decided once
    assert dataclasses.asdict(resolved.dp)["reproducible_noise"] is False


def test_secure_rng_with_reproducible_noise_is_a_one_line_error():
    with pytest.raises(ConfigError, match="dp.secure_rng=true draws secret noise, but "
                                          "dp.reproducible_noise=true"):
        RunConfig.from_dict({"dp": {"epsilon": 3, "secure_rng": True, "reproducible_noise": True}})
