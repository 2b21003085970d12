"""Config validation (fedlora.config.RunConfig.from_dict) and the communication formulas."""

from __future__ import annotations

import pytest

from fedlora.report.comm import expected_params
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.strategies import FFA, STRATEGIES, FedEx, FedIT, FedSB, FedSVD, LoRAFAIR

HEAD_PARAMS = 21 * 384 + 21  # classifier.weight + classifier.bias for 21 labels


@pytest.mark.parametrize("raw,message", [
    ({"strategy": "fedsbb"},
     f"strategy 'fedsbb' is unknown; choose one of: {', '.join(sorted(STRATEGIES))}"),
    ({"rank": 0}, "rank=0 must be a positive integer; set rank >= 1"),
    ({"rank": -1}, "rank=-1 must be a positive integer; set rank >= 1"),
    ({"rank": 2.5}, "rank=2.5 is not a number of type int; set rank to one"),
    ({"clients": 5, "clients_per_round": 6},
     "clients_per_round=6 exceeds clients=5; set clients_per_round <= 5 or raise clients"),
    ({"clients_per_round": 0}, "clients_per_round=0 must be a positive integer; set clients_per_round >= 1"),
    ({"partition": {"name": "shards"}},
     "partition 'shards' is unknown; choose one of: iid, dirichlet, pathological"),
    ({"partition": "shards"}, "partition 'shards' is unknown; choose one of: iid, dirichlet, pathological"),
    ({"partition": {"name": "pathological", "labels_per_client": 0}},
     "partition.labels_per_client=0 must be a positive integer; set partition.labels_per_client >= 1"),
    ({"participation": "poisson"},
     "participation 'poisson' is unknown; choose one of: uniform, bernoulli, markov, cyclic"),
    ({"participation": {"name": "markov", "a": 1.5}},
     "participation.a=1.5 is a probability; set it <= 1"),
    ({"participation": {"name": "cyclic", "length": 0}},
     "participation.length=0 must be a positive integer; set participation.length >= 1"),
    ({"participation": {"window": 3}},
     "'participation.window' is not a fedlora setting; valid keys under participation: name, "
     "mean_p, p_min, alpha_part, a, length"),
    ({"weighting": "inverse"}, "weighting 'inverse' is unknown; choose one of: samples, uniform, fedau"),
    ({"server_lr": 0}, "server_lr=0.0 must be > 0"),
    ({"fedau": {"cutoff": 0}}, "fedau.cutoff=0 must be a positive integer; set fedau.cutoff >= 1"),
    ({"fedsvd": {"period": -1}}, "fedsvd.period=-1 must be an integer >= 0"),
    ({"lorafair": {"objective": "l2"}}, "lorafair.objective 'l2' is unknown; choose one of: cos, ls"),
    ({"lorafair": {"lam": -0.1}}, "lorafair.lam=-0.1 must be >= 0"),
    ({"fedex": {"residual": "sparse"}},
     "fedex.residual 'sparse' is unknown; choose one of: dense, factored"),
    ({"partition_alpha": 0.1}, "'partition_alpha' is not a fedlora setting; see fedlora/conf/config.yaml "
     "for the valid keys"),
    ({"rounds": "abc"}, "rounds='abc' is not a number of type int; set rounds to one"),
    ({"rounds": True}, "rounds=True is not a number of type int; set rounds to one"),
    ({"foo": 1}, "'foo' is not a fedlora setting; see fedlora/conf/config.yaml for the valid keys"),
    ({"fedsb": {"init_samples": 0}},
     "fedsb.init_samples=0 must be a positive integer; set fedsb.init_samples >= 1"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction=1.0 must be in (0, 1)"),
    ({"faults": {"crash_prob": 1.0}}, "faults.crash_prob=1.0 is a probability; set it < 1"),
    ({"faults": {"crash_prob": -0.1}}, "faults.crash_prob=-0.1 must be >= 0"),
    ({"faults": {"drop_prob": 0.1}},
     "'faults.drop_prob' is not a fedlora setting; valid keys under faults: crash_prob"),
    ({"clients": 20, "clients_per_round": 5, "min_clients": 6},
     "min_clients=6 exceeds clients_per_round=5; set min_clients <= 5"),
    ({"min_clients": 0}, "min_clients=0 must be a positive integer; set min_clients >= 1"),
    ({"round_timeout": 0}, "round_timeout=0.0 must be > 0"),
    ({"checkpoint_every": -1}, "checkpoint_every=-1 must be an integer >= 0"),
])
def test_from_dict_rejects_bad_values_with_one_line_message(raw, message):
    # Execute
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(raw)

    # Assert
    assert str(error.value) == message
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    (["fedsb.init_samples=many"],
     "fedsb.init_samples='many' is not a number of type int; set fedsb.init_samples to one"),
    (["lorafair.lamda=0.1"],
     "'lorafair.lamda' is not a fedlora setting; valid keys under lorafair: objective, lam, steps"),
    (["verbose=maybe"], "verbose='maybe' is not a value of type bool; set verbose to one"),
    (["targets=query"], "targets='query' is not a list; write it as targets=[a,b] (or targets=[] "
                        "for none)"),
    (["participation=poisson"],
     "participation 'poisson' is unknown; choose one of: bernoulli, cyclic, markov, uniform"),
])
def test_hydra_refuses_unknown_keys_and_wrong_types_as_one_line(overrides, message):
    # Hydra composes against the structured config generated from the settings dataclasses
    # (methods' sections included), so it refuses these itself; fedlora words them as one line.
    from fedlora.run.cli import compose_config

    # Execute
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)

    # Assert
    assert str(error.value) == message


def test_hydra_converts_values_to_the_fields_types():
    # Prepare
    from fedlora.run.cli import compose_config

    # Execute
    raw = compose_config(["fedsb.init_samples=64", "partition.alpha=1", "verbose=true",
                          "clients=null", "targets=[query,value]"])

    # Assert: an int stays an int, an int given for a float becomes one, null is the default
    assert raw["fedsb"]["init_samples"] == 64 and isinstance(raw["partition"]["alpha"], float)
    assert raw["verbose"] is True and raw["clients"] is None and raw["targets"] == ["query", "value"]
    assert RunConfig.from_dict(raw).clients == 100


def test_a_multirun_checks_every_swept_value_before_hydra_starts():
    # Prepare
    from fedlora.run.cli import check_command_line

    # Execute / Assert: the bad value is the second of its axis
    check_command_line(["-m", "rank=4,8", "seed=0,1"])
    with pytest.raises(ConfigError, match=r"^rank='eight' is not a number of type int; set rank "
                                          "to one$"):
        check_command_line(["-m", "seed=0,1", "rank=4,eight"])


def test_config_error_is_a_value_error():
    # Execute / Assert
    with pytest.raises(ValueError):
        RunConfig.from_dict({"rank": 0})


def test_fedsb_defaults_give_rank_32_and_scale_one():
    # Execute
    cfg = RunConfig.from_dict({"strategy": "fedsb"})

    # Assert
    assert cfg.strategy == "fedsb"
    assert cfg.rank == 32
    assert cfg.alpha == 32.0
    assert cfg.alpha / cfg.rank == 1.0
    assert cfg.lr == FedSB.defaults["lr"]
    assert cfg.model_spec(21).latent is True


def test_fedavg_defaults_give_rank_8_alpha_16():
    # Execute
    cfg = RunConfig.from_dict({"strategy": "fedavg"})

    # Assert
    assert cfg.rank == 8
    assert cfg.alpha == 16.0
    assert cfg.lr == FedIT.defaults["lr"]
    assert cfg.model_spec(21).latent is False


def test_default_strategy_is_fedsb_and_hydra_nulls_mean_defaults():
    # Execute: Hydra passes unset keys as None
    cfg = RunConfig.from_dict({"rank": None, "alpha": None, "lr": None, "clients_per_round": None})

    # Assert
    assert (cfg.strategy, cfg.rank, cfg.alpha, cfg.clients_per_round) == ("fedsb", 32, 32.0, 10)


def test_alpha_follows_a_given_rank():
    # Execute
    fedsb = RunConfig.from_dict({"strategy": "fedsb", "rank": 16})
    fedavg = RunConfig.from_dict({"strategy": "fedavg", "rank": 4})
    explicit = RunConfig.from_dict({"strategy": "fedavg", "rank": 4, "alpha": 3})

    # Assert
    assert fedsb.alpha == 16.0
    assert fedavg.alpha == 8.0
    assert explicit.alpha == 3.0


@pytest.mark.parametrize("clients,per_round", [(100, 10), (10, 10), (5, 5), (1, 1)])
def test_clients_per_round_defaults_to_min_10_clients(clients, per_round):
    # Execute
    cfg = RunConfig.from_dict({"clients": clients})

    # Assert
    assert cfg.clients == clients
    assert cfg.clients_per_round == per_round


def test_new_settings_default_to_the_papers_and_are_read():
    # Execute
    default = RunConfig.from_dict({})
    cfg = RunConfig.from_dict({"weighting": "fedau", "server_lr": 2, "fedau": {"cutoff": 50},
                               "participation": {"name": "cyclic", "length": 20, "mean_p": 0.3},
                               "partition": {"name": "pathological", "labels_per_client": 3},
                               "fedsvd": {"period": 0}, "lorafair": {"objective": "ls", "lam": 0},
                               "fedex": {"residual": "factored"}})

    # Assert
    assert (default.weighting, default.server_lr, default.fedau.cutoff) == ("samples", 1.0, None)
    assert default.participation.name == "uniform" and default.partition.labels_per_client == 2
    assert (default.methods["fedsvd"].period, default.methods["fedex"].residual) == (1, "dense")
    assert (default.methods["lorafair"].objective, default.methods["lorafair"].lam, default.methods["lorafair"].steps) == ("cos", 0.01, 200)
    assert (cfg.weighting, cfg.server_lr, cfg.fedau.cutoff) == ("fedau", 2.0, 50)
    assert (cfg.participation.name, cfg.participation.length, cfg.participation.mean_p) == ("cyclic", 20, 0.3)
    assert (cfg.partition.name, cfg.partition.labels_per_client) == ("pathological", 3)
    assert (cfg.methods["fedsvd"].period, cfg.methods["lorafair"].objective, cfg.methods["lorafair"].lam) == (0, "ls", 0.0)
    assert cfg.methods["fedex"].residual == "factored"


def test_every_option_of_a_config_group_carries_the_same_keys():
    # Prepare: `partition.alpha=0.1 partition=dirichlet` must work whatever the group's default
    import yaml
    from pathlib import Path

    conf = Path(__file__).parents[1] / "fedlora" / "conf"

    # Execute / Assert
    for group in ("partition", "participation"):
        keys = {option.stem: set(yaml.safe_load(option.read_text()))
                for option in (conf / group).glob("*.yaml")}
        assert len(keys) >= 3 and len({frozenset(k) for k in keys.values()}) == 1, keys
        for option, option_keys in keys.items():
            raw = yaml.safe_load((conf / group / f"{option}.yaml").read_text())
            assert raw["name"] == option
            RunConfig.from_dict({group: raw})  # every option validates


def test_partition_and_data_are_read():
    # Execute
    cfg = RunConfig.from_dict({"partition": {"name": "dirichlet", "alpha": 0.1},
                               "data": {"path": "/tmp/x", "label_field": "topic"}})

    # Assert
    assert cfg.partition.name == "dirichlet"
    assert cfg.partition.alpha == 0.1
    assert cfg.data.path == "/tmp/x"
    assert cfg.data.label_field == "topic"
    assert cfg.data.text_field == "text"


# --------------------------------------------------------------------------------------------
# Communication formulas (ALGORITHMS.md, "Communication cost")


def test_expected_params_fedsb_is_r_squared_per_matrix_plus_head():
    # Execute
    expected = expected_params(FedSB, [(384, 384)] * 12, 32, HEAD_PARAMS)

    # Assert
    assert expected == {"up": 32 * 32 * 12 + HEAD_PARAMS, "down": 32 * 32 * 12 + HEAD_PARAMS}
    assert expected["up"] == 20373


def test_expected_params_fedit_is_r_times_m_plus_n_per_matrix_plus_head():
    # Execute
    expected = expected_params(FedIT, [(384, 384)] * 12, 8, HEAD_PARAMS)

    # Assert
    assert expected == {"up": 8 * (384 + 384) * 12 + HEAD_PARAMS,
                        "down": 8 * (384 + 384) * 12 + HEAD_PARAMS}
    assert expected["up"] == 81813


def test_expected_params_on_non_square_layers():
    # Execute
    fedit = expected_params(FedIT, [(5, 7), (3, 2)], 2, 0)
    fedsb = expected_params(FedSB, [(5, 7), (3, 2)], 2, 0)

    # Assert
    assert fedit["up"] == 2 * 12 + 2 * 5
    assert fedsb["up"] == 4 + 4


@pytest.mark.parametrize("cls,up,down", [
    (FFA, 8 * 384, 8 * 384),
    (FedSVD, 8 * 384, 8 * (384 + 384)),
    (LoRAFAIR, 8 * (384 + 384), 8 * (384 + 384)),
    (FedEx, 8 * (384 + 384), 8 * (384 + 384) + 384 * 384),
])
def test_expected_params_of_the_product_methods_follow_algorithms_md(cls, up, down):
    # Execute
    expected = expected_params(cls, [(384, 384)] * 12, 8, HEAD_PARAMS)

    # Assert
    assert expected == {"up": up * 12 + HEAD_PARAMS, "down": down * 12 + HEAD_PARAMS}


def test_worked_totals_of_note_b_section_5():
    # MiniLM q,v (12 matrices of 384 x 384) at r = 8, no head: the note's worked integers
    layers = [(384, 384)] * 12

    # Execute / Assert
    assert expected_params(FedIT, layers, 8, 0)["up"] == 73_728
    assert expected_params(FFA, layers, 8, 0)["up"] == 36_864
    assert expected_params(FedSVD, layers, 8, 0) == {"up": 36_864, "down": 73_728}
    assert expected_params(FedEx, layers, 8, 0)["down"] == 1_843_200


@pytest.mark.parametrize("raw", [
    {},
    {"strategy": "fedavg", "clients": 7, "clients_per_round": 3, "rank": 4, "targets": "query,key",
     "partition": {"name": "dirichlet", "alpha": 0.1}, "participation": {"name": "markov", "a": 0.2},
     "weighting": "fedau", "fedau": {"cutoff": 5}, "faults": {"crash_prob": 0.3}, "min_clients": 2,
     "round_timeout": 60, "checkpoint_every": 3, "data": {"path": "x.jsonl"}, "verbose": True},
])
def test_saved_config_reads_back_equal(raw):
    # A resumed run rebuilds its config from the config.yaml the run wrote (to_dict + out).
    import yaml

    cfg = RunConfig.from_dict(raw)
    saved = yaml.safe_load(yaml.safe_dump({**cfg.to_dict(), "out": "DIR"}))
    assert RunConfig.from_saved(saved) == cfg
