"""The GPU path: fractional GPUs per client. Skipped where no CUDA device exists (CI)."""

import json

import pytest
import torch

from tests.test_simulation import simulate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_two_rounds_on_fractional_gpus(tmp_path):
    done = simulate(tmp_path, "strategy=fedsb", "clients=4", "clients_per_round=4", "rounds=2",
                    "local_steps=4", "device=cuda", "client_gpus=0.25")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert [r["clients_trained"] for r in rows[1:]] == [4, 4]
