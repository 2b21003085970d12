"""Record-level DP-SGD (``dp=...``): accounting, planning, the Opacus-wrapped client, the
server's ledger, config errors, and one tiny end-to-end DP simulation.

The independent reference is Google's ``dp-accounting`` RDP accountant on
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``.
"""

from __future__ import annotations

import json
import random

import dp_accounting
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlora.model import pretrained as models

from fedlora.privacy import accounting as privacy
from fedlora.clients.app import train
from fedlora.clients.dp import ClientPrivacy, check_opacus_can_wrap, private_gradient_sum
from fedlora.clients.train import base_gradient_sum, client_update
from fedlora.config import RunConfig, client_config
from fedlora.config import PartitionConfig
from fedlora.tasks.data import client_partitions
from fedlora.tasks.classification import Batches, load_dataset
from fedlora.core.errors import ConfigError
from fedlora.strategies import get_strategy

from tests.test_simulation import read_run, simulate


def reference_epsilon(history, delta: float) -> float:
    """Epsilon of a history by dp-accounting's RDP accountant (not Opacus)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma, rate, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# --------------------------------------------------------------------------------------------
# Accounting and planning (pure)


@settings(max_examples=12, deadline=None)
@given(rate=st.floats(0.01, 1.0), steps=st.integers(1, 400), sigma=st.floats(0.6, 30.0))
def test_rdp_epsilon_agrees_with_dp_accounting(rate, steps, sigma):
    # Execute
    theirs = reference_epsilon([(sigma, rate, steps)], 1e-5)
    # Budgets people set (eps <= 20); far above, dp-accounting drops the small orders it cannot
    # compute (q = 0.6, sigma = 1: eps 61 there, 58 here), and neither is a useful guarantee.
    assume(theirs <= 20)
    ours = privacy.epsilon_spent([(sigma, rate, steps)], 1e-5, "rdp")

    # Assert
    assert abs(ours - theirs) <= 0.05 * theirs


@pytest.mark.parametrize("rate,steps,init_rate", [(1.0, 200, 1.0), (0.1, 64, 0.0), (0.3, 16, 0.5)])
def test_planned_noise_is_the_smallest_within_the_target(rate, steps, init_rate):
    # Execute
    sigma = privacy.plan_noise_multiplier(3.0, 1e-5, rate, steps, "rdp", init_rate)
    spent = privacy.epsilon_spent(privacy.planned_history(sigma, rate, steps, init_rate), 1e-5, "rdp")
    below = privacy.epsilon_spent(privacy.planned_history(sigma - 0.01, rate, steps, init_rate),
                                  1e-5, "rdp")

    # Assert: eps(sigma) <= target < eps(sigma - 0.01), and the independent accountant agrees
    assert spent <= 3.0 < below
    reference = reference_epsilon(privacy.planned_history(sigma, rate, steps, init_rate), 1e-5)
    assert abs(spent - reference) <= 0.05 * reference


def test_prv_is_not_looser_than_rdp():
    # Prepare
    history = [(1.1, 0.05, 300)]

    # Execute / Assert: PRV is the tighter accountant (within its 0.01 error)
    assert privacy.epsilon_spent(history, 1e-5, "prv") <= privacy.epsilon_spent(history, 1e-5, "rdp") + 0.01


def test_history_merges_equal_steps_and_travels_as_lists():
    # Execute
    history = privacy.add_steps([], 2.0, 0.5, 3)
    history = privacy.add_steps(history, 2.0, 0.5, 4)
    history = privacy.add_steps(history, 2.0, 1.0, 1)
    record = privacy.history_to_record(history)

    # Assert
    assert history == [(2.0, 0.5, 7), (2.0, 1.0, 1)]
    assert privacy.history_from_record(record) == history
    assert privacy.total_steps(history) == 8
    assert privacy.epsilon_spent([], 1e-5, "rdp") == 0.0


def test_client_delta_stays_below_one_over_n():
    assert privacy.client_delta(1e-5, 50) == 1e-5
    assert privacy.client_delta(0.5, 50) == 1 / 50
    assert privacy.sample_rate(16, 15) == 1.0 and privacy.sample_rate(16, 160) == 0.1


def test_ledger_keeps_the_longer_history_and_round_trips():
    # Prepare
    ledger = privacy.PrivacyLedger(3.0, "rdp")
    long = {"dp-noise-multiplier": 2.0, "dp-sample-rate": 0.5, "dp-delta": 1e-5,
            "dp-epsilon": 1.5, **privacy.history_to_record([(2.0, 0.5, 8)])}
    short = {**long, "dp-epsilon": 0.9, **privacy.history_to_record([(2.0, 0.5, 4)])}

    # Execute
    ledger.record(7, long)
    ledger.record(7, short)  # a stale copy: must not undercount
    ledger.decline(3)
    restored = privacy.PrivacyLedger(3.0, "rdp")
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))

    # Assert
    assert restored.clients == ledger.clients and restored.declined == {3}
    assert restored.max_epsilon() == 1.5
    assert restored.config_for(7)["dp-known-steps"] == [8]
    assert restored.report()["clients"]["7"]["steps"] == 8


# --------------------------------------------------------------------------------------------
# Config errors: one line, before any worker starts


@pytest.mark.parametrize("section,message", [
    ({"epsilon": 0}, "dp.epsilon=0.0 must be > 0"),
    ({"epsilon": -2}, "dp.epsilon=-2.0 must be > 0"),
    ({"epsilon": 3, "delta": 1}, "dp.delta=1.0 must be < 1"),
    ({"epsilon": 3, "clip": 0}, "dp.clip=0.0 must be > 0"),
    ({"epsilon": 3, "accountant": "gdp"}, "dp.accountant 'gdp' is unknown; choose one of: rdp, prv"),
    ({"epsilon": 3, "mode": "client", "clipping": "nosuch"},
     "dp.clipping 'nosuch' is unknown; choose one of: fixed, adaptive"),
    ({"epsilon": 3, "mode": "client", "clip": -1}, "dp.clip=-1.0 must be > 0"),
    ({"epsilon": 3, "mode": "client", "noise_multiplier": 1.0},
     "dp.epsilon=3 and dp.noise_multiplier=1 are both set; give one"),
    ({"noise_multiplier": 1.0}, "dp.noise_multiplier is for dp.mode=client"),
])
def test_invalid_dp_settings_are_one_line_errors(section, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"dp": section})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_inf_or_null_epsilon_means_no_dp():
    assert not RunConfig.from_dict({"dp": {"epsilon": float("inf")}}).dp.enabled
    assert not RunConfig.from_dict({"dp": {"epsilon": None}}).dp.enabled
    assert RunConfig.from_dict({"dp": {"epsilon": 3}}).dp.epsilon == 3.0


def test_a_model_opacus_cannot_wrap_is_a_config_error():
    # Prepare: a trainable BatchNorm mixes examples, so no per-example gradient exists
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))

    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        check_opacus_can_wrap(model, "toy")
    assert str(error.value).startswith("model='toy' cannot be trained with DP-SGD")
    assert "\n" not in str(error.value)
    check_opacus_can_wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), "toy")  # no error


def test_command_line_dp_error_stops_before_ray(tmp_path):
    done = simulate(tmp_path, "dp.epsilon=-1", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: dp.epsilon=-1.0 must be > 0"]


# --------------------------------------------------------------------------------------------
# The Opacus-wrapped client on the real model (rank 2, one worker's shared cached model)


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig.from_dict({"strategy": "fedavg", "clients": 4, "rank": 2, "seed": 0,
                               "max_length": 16, "batch_size": 4})
    bundle = models.cached_model(cfg.model_spec(21))
    data = load_dataset(cfg.data)
    batches = Batches(bundle.tokenizer, data.train.texts, data.train.labels, cfg.max_length)
    return cfg, bundle, batches


def train_once(bundle, batches, privacy_setting, seed=0, parts=("A", "B", "head"), lr=1e-2):
    bundle.load(bundle.initial_state)
    trainable = bundle.set_trainable(parts)
    steps = [batches.collate(list(range(i * 4, i * 4 + 4))) for i in range(3)]
    torch.manual_seed(seed)
    client_update(bundle.model, trainable, steps, lr, privacy=privacy_setting)
    return bundle.state(parts)


def dp_setting(sigma: float, clip: float) -> ClientPrivacy:
    return ClientPrivacy(target_epsilon=3.0, delta=1e-5, clip=clip, accountant="rdp",
                         noise_multiplier=sigma, sample_rate=0.1, batch_size=4,
                         noise_generator=torch.Generator().manual_seed(5))


def test_zero_noise_and_huge_clip_equal_plain_training(setup):
    # Prepare: float64, so that the order of summation (per-example sums vs the batch
    # gradient, and torch's thread count, which earlier tests change) cannot show; in float32
    # Adam magnifies it where a gradient is tiny
    _, bundle, batches = setup
    bundle.model.double()
    try:
        # Execute: the same batches and seed, plain and through Opacus with sigma = 0, C = 1e9
        plain = train_once(bundle, batches, None)
        private = train_once(bundle, batches, dp_setting(0.0, 1e9))
    finally:
        bundle.model.float()  # the cached model is shared with later tests (exact round trip)

    # Assert
    for key in plain:
        assert plain[key].dtype == torch.float64, key
        update = (plain[key] - bundle.initial_state[key].double()).abs().max()
        assert update > 0, key
        assert (private[key] - plain[key]).abs().max() <= 1e-9 * update, key


def test_dp_changes_the_adapter_leaves_no_hooks_and_the_model_still_predicts(setup):
    # Prepare
    _, bundle, batches = setup
    fresh = train_once(bundle, batches, None, seed=1)

    # Execute
    noisy = train_once(bundle, batches, dp_setting(1.0, 0.5), seed=1)
    after = train_once(bundle, batches, None, seed=1)  # a plain client after a DP client

    # Assert: DP moved every trained tensor, differently from plain training
    for key in noisy:
        assert not torch.equal(noisy[key], bundle.initial_state[key]), key
    assert any(not torch.allclose(noisy[k], fresh[k]) for k in noisy)
    # the shared model is clean: no Opacus hooks or attributes, identical plain training
    for key in fresh:
        assert torch.equal(after[key], fresh[key]), key
    for module in bundle.model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for param in bundle.model.parameters():
        assert not hasattr(param, "grad_sample") and not hasattr(param, "summed_grad")
    # and the DP-trained model still predicts: finite logits for a batch
    bundle.load(noisy)
    bundle.model.eval()
    with torch.no_grad():
        batch = batches.collate(list(range(16)))
        logits = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (16, 21) and torch.isfinite(logits).all()


def test_private_init_gradient_clips_each_example_and_adds_noise(setup):
    # Prepare
    _, bundle, batches = setup
    bundle.load(bundle.initial_state)
    layer = bundle.model.get_submodule(bundle.adapted[0])
    weights = {"w": layer.base.weight}
    examples = [0, 1, 2]

    # Execute
    exact = base_gradient_sum(bundle.model, weights, [batches.collate([i]) for i in examples])
    unclipped = private_gradient_sum(bundle.model, weights, batches, examples, 1e9, 0.0,
                                     torch.Generator().manual_seed(0))
    clipped = private_gradient_sum(bundle.model, weights, batches, examples, 1e-3, 0.0,
                                     torch.Generator().manual_seed(0))
    noisy = private_gradient_sum(bundle.model, weights, batches, examples, 1e-3, 2.0,
                                     torch.Generator().manual_seed(0))

    # Assert
    assert torch.allclose(unclipped["w"], exact["w"], atol=1e-5, rtol=1e-4)
    assert clipped["w"].norm() <= 3 * 1e-3 * (1 + 1e-4)
    noise = noisy["w"] - clipped["w"]
    assert abs(noise.std().item() - 2.0 * 1e-3) <= 0.05 * 2.0 * 1e-3
    assert layer.base.weight.requires_grad is False


# --------------------------------------------------------------------------------------------
# Accounting across rounds, through the real train handler and the server's strategy


def dp_federation(bundle, strategy="fedavg", rounds=3, **dp):
    cfg = RunConfig.from_dict({"strategy": strategy, "clients": 4, "clients_per_round": 2,
                               "rank": 2, "seed": 0, "local_steps": 2, "batch_size": 4,
                               "max_length": 16, "rounds": rounds,
                               "dp": {"epsilon": 3.0, **dp}})
    server = get_strategy(strategy).from_config(cfg, bundle.head_keys)
    server.register_nodes({10 + p: p for p in range(4)})
    return cfg, server


def new_context(partition_id: int) -> Context:
    return Context(run_id=1, node_id=10 + partition_id, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition_id, "num-partitions": 4})


@pytest.mark.usefixtures("flower_task")
def test_epsilon_grows_persists_across_recreation_matches_reference_and_clients_decline(setup):
    # Prepare
    _, bundle, _ = setup
    cfg, server = dp_federation(bundle, rounds=2)
    contexts = {10 + p: new_context(p) for p in range(4)}
    arrays = ArrayRecord(bundle.initial_state)
    sizes = {p: len(ix) for p, ix in enumerate(client_partitions(cfg.task_spec(), 4, PartitionConfig(), 0))}
    epsilons, sampled = [], []

    # Execute: 5 rounds of 2 clients, but the budget is planned for 2 rounds of each of the 4
    # (so someone must decline); in round 3 all node states are lost (recreated client
    # processes): the server's copy must restore them
    for server_round in range(1, 6):
        if server_round == 3:
            contexts = {10 + p: new_context(p) for p in range(4)}
        messages = server.configure_train(server_round, arrays, ConfigRecord(client_config(cfg, 21)), None)
        sampled.append(sorted(server.partition_of[m.metadata.dst_node_id] for m in messages))
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        assert all(not r.has_error() for r in replies)
        new_arrays, _ = server.aggregate_train(server_round, replies)
        arrays = new_arrays or arrays
        epsilons.append(server.privacy.max_epsilon())

    # Assert: the headline epsilon never falls and never exceeds the target
    assert all(a <= b for a, b in zip(epsilons, epsilons[1:])) and max(epsilons) <= 3.0
    assert epsilons[0] > 0
    report = server.privacy.report()
    for partition, client in report["clients"].items():
        history = [tuple(e) for e in client["history"]]
        assert client["steps"] == privacy.total_steps(history) <= 2 * cfg.local_steps
        assert client["delta"] == min(1e-5, 1 / sizes[int(partition)])
        reference = reference_epsilon(history, client["delta"])
        assert abs(client["epsilon"] - reference) <= 0.05 * reference
        assert client["epsilon"] <= 3.0
    # a client sampled a third time declined (its planned budget is 2 rounds) and is never
    # sampled again; every client that trained twice is one the server stops choosing
    twice = {p for p in range(4) if sum(p in s for s in sampled) >= 2}
    assert server.privacy.declined, sampled
    assert server.privacy.declined <= twice
    for partition in server.privacy.declined:
        first_decline = next(i for i, s in enumerate(sampled)
                             if sum(partition in t for t in sampled[:i + 1]) == 3)
        assert all(partition not in s for s in sampled[first_decline + 1:])
    # the server's copy survives a strategy restart (checkpoint)
    restored = get_strategy("fedavg").from_config(cfg, bundle.head_keys)
    restored.load_state_dict(json.loads(json.dumps(server.state_dict())))
    assert restored.privacy.report() == report


# --------------------------------------------------------------------------------------------
# End to end: python -m fedlora.simulate with dp.epsilon


@pytest.mark.slow  # a real simulation
def test_dp_simulation_reports_epsilon_per_round_and_privacy_json(tmp_path):
    # Execute
    done = simulate(tmp_path, "strategy=fedsb", "clients=4", "clients_per_round=2", "rounds=2",
                    "local_steps=2", "max_length=16", "dp.epsilon=3", "fedsb.init_samples=8")
    assert done.returncode == 0, done.stderr[-3000:]
    rows, summary = read_run(tmp_path)

    # Assert
    epsilons = [r["epsilon"] for r in rows]
    assert epsilons[0] > 0  # the privatised Fed-SB init is charged before round 1
    assert all(a <= b for a, b in zip(epsilons, epsilons[1:])) and epsilons[-1] <= 3.0
    assert all(r["clients_trained"] is None for r in rows)  # DP rows count no clients ...
    sampled = (tmp_path / "participation.csv").read_text().splitlines()[1:]
    assert [line.count(",1") for line in sampled] == [2, 2]  # ... the server's own sample does
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["max_epsilon"] == epsilons[-1] and report["accountant"] == "rdp"
    for client in report["clients"].values():
        assert set(client) >= {"noise_multiplier", "steps", "delta", "epsilon", "accountant"}
        reference = reference_epsilon([tuple(e) for e in client["history"]], client["delta"])
        assert abs(client["epsilon"] - reference) <= 0.05 * reference <= 3.0
    assert summary["config"]["dp"]["epsilon"] == 3.0 and summary["epsilon"] == epsilons[-1]
    assert f"eps {epsilons[-1]:.3f}" in done.stdout


def test_an_empty_poisson_batch_is_a_noise_only_step(setup):
    # Prepare
    _, bundle, _ = setup
    bundle.load(bundle.initial_state)
    trainable = bundle.set_trainable(("B", "head"))

    # Execute: two empty samples; with sigma = 0 nothing moves, with noise everything does
    silent = client_update(bundle.model, trainable, [None, None], 1e-2,
                           privacy=dp_setting(0.0, 1.0))
    unchanged = bundle.state(("B", "head"))
    noisy = client_update(bundle.model, trainable, [None, None], 1e-2,
                          privacy=dp_setting(1.0, 1.0))

    # Assert
    assert silent["steps"] == noisy["steps"] == 2
    for key, value in unchanged.items():
        assert torch.equal(value, bundle.initial_state[key]), key
    for key, value in bundle.state(("B", "head")).items():
        assert not torch.equal(value, bundle.initial_state[key]), key
