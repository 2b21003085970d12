"""The server's secret randomness under client-level DP, and what a checkpoint may hold.

In secret mode the server's DP draws (client-level DP's update and count noise, its Poisson
sample of clients) come from key streams under keys the OS gives the server process, held in
memory only: no checkpoint holds them, and a resumed run draws afresh. A checkpoint holds
tensors and plain values only and is loaded with ``weights_only=True``, so a planted file
cannot run code. Reproducible mode still resumes bit for bit.

Oracles: the noise's known standard deviation, the planned sampling rate, a replay of the
seeded sampler, an uninterrupted run, and a flag a planted pickle would set."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.aggregation.participation import ClientSampler
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.privacy.randomness import KeyStream
from fedlora.run.checkpoint import CHECKPOINT, FINAL_ADAPTER, load_checkpoint
from fedlora.run.server import run_server
from tests.federation import Federation
from tests.test_resume import Killed, SeededGrid, fresh_clients, make_run, rows_of, without_timing
from tests.test_server_loop import make_tiny_bundle

pytestmark = pytest.mark.usefixtures("flower_task")

CLIENT_DP = {"mode": "client", "noise_multiplier": 1.0, "clipping": "adaptive"}


def test_secret_client_level_noise_comes_from_a_key_stream_of_the_servers_own():
    # Prepare: two servers of the same run (same seed), secret noise; a set-up release of a
    # zero sum is the noise alone, std sigma C = 2
    sums = [{"w": torch.zeros(200, 200, dtype=torch.float64)}]
    first, second = (Federation("fedavg", clients_per_round=2,
                                dp={"mode": "client", "noise_multiplier": 2.0, "clip": 1.0})
                     for _ in range(2))

    # Execute
    noise = first.strategy.private_setup(sums)[0]["w"]
    other = second.strategy.private_setup(sums)[0]["w"]

    # Assert: a key stream (not a 32-bit-seeded torch.Generator), the right std, not the seed's
    assert first.cfg.dp.noise == "secret"
    assert isinstance(first.strategy.client_dp.generator, KeyStream)
    assert noise.std().item() == pytest.approx(2.0, rel=0.02)
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), other.flatten()]))[0, 1]) < 0.05


def test_the_secret_client_sample_hits_the_rate_but_no_seed_replays_it():
    # Prepare: two samplers of the same run (same seed), and the seeded one
    settings = RunConfig.from_dict({}).participation
    secret = [ClientSampler(settings, 20, 10, seed=3) for _ in range(2)]
    seeded = ClientSampler(settings, 20, 10, seed=3)
    for sampler in secret:
        sampler.use_rate(0.5, secret=True)
    seeded.use_rate(0.5)

    # Execute
    samples = [[sampler.sample(t, list(range(20))) for t in range(1, 201)]
               for sampler in (*secret, seeded)]

    # Assert: rate 1/2 (4000 Bernoulli draws: standard error 0.008), three different samples
    for drawn in samples:
        assert sum(map(len, drawn)) / 4000 == pytest.approx(0.5, abs=0.04)
    assert samples[0] != samples[1] and samples[0] != samples[2]
    state = secret[0].state_dict()["model"]
    assert state == {"next_round": 200}  # no generator state to replay it from
    with pytest.raises(ValueError, match="cannot be replayed"):
        secret[0].model.matrix(3)


def secret_client_level_run(tmp_path, kill_in: int | None = None, resume: bool = False):
    cfg, data = make_run("fedavg", rounds=6, dp={**CLIENT_DP, "reproducible_noise": False})
    bundle = make_tiny_bundle()
    return run_server(SeededGrid(fresh_clients(bundle, 500 if resume else 100), kill_in=kill_in),
                      cfg, tmp_path, bundle, data, resume=resume)


def test_a_secret_run_checkpoints_no_generator_state_and_resumes_with_fresh_randomness(tmp_path):
    # Execute: killed in round 5 (the checkpoint is of round 4), then resumed
    with pytest.raises(Killed):
        secret_client_level_run(tmp_path, kill_in=5)
    checkpoint = load_checkpoint(tmp_path)
    secret_client_level_run(tmp_path, resume=True)

    # Assert: nothing of the noise's or the sample's randomness was saved ...
    assert checkpoint["round"] == 4
    client_dp = checkpoint["strategy"]["client_dp"]
    assert set(client_dp) == {"history", "releases", "adaptive"}
    assert checkpoint["strategy"]["sampler"]["model"] == {"next_round": 4}
    # ... and the resumed run went on from the checkpoint's accountant and clip
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert [r["round"] for r in rows_of(tmp_path)] == list(range(7))
    assert [r["round"] for r in privacy["releases"]] == list(range(1, 7))
    assert privacy["releases"][4]["clip"] == pytest.approx(client_dp["adaptive"]["clip"])


def test_a_reproducible_client_level_run_still_resumes_bit_for_bit(tmp_path):
    # Prepare
    cfg, data = make_run("fedavg", rounds=6, dp={**CLIENT_DP, "reproducible_noise": True})
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    bundle = make_tiny_bundle()
    run_server(SeededGrid(fresh_clients(bundle, 100)), cfg, reference_dir, bundle, data)

    # Execute
    bundle = make_tiny_bundle()
    with pytest.raises(Killed):
        run_server(SeededGrid(fresh_clients(bundle, 100), kill_in=5), cfg, run_dir, bundle, data)
    bundle = make_tiny_bundle()
    run_server(SeededGrid(fresh_clients(bundle, 500)), cfg, run_dir, bundle, data, resume=True)

    # Assert
    assert "generator" in load_checkpoint(run_dir)["strategy"]["client_dp"]
    assert without_timing(rows_of(run_dir)) == without_timing(rows_of(reference_dir))
    final = torch.load(run_dir / FINAL_ADAPTER)["adapter"]
    expected = torch.load(reference_dir / FINAL_ADAPTER)["adapter"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


PLANTED = []


def planted_code() -> None:
    """What a planted checkpoint runs when it is unpickled with ``weights_only=False``."""
    PLANTED.append("ran")


class Planted:
    def __reduce__(self):
        return planted_code, ()


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    # Prepare: a well-formed torch.save archive that calls a function when unpickled
    torch.save({"round": 3, "strategy": Planted()}, tmp_path / CHECKPOINT)
    PLANTED.clear()

    # Execute
    with pytest.raises(ConfigError) as error:
        load_checkpoint(tmp_path)

    # Assert
    assert PLANTED == []
    assert "could run code when loaded" in str(error.value) and "\n" not in str(error.value)
