"""The GPU path: fractional GPUs per client, bf16, 4-bit base weights. Skipped where no CUDA
device exists (CI); the same settings on a CPU are tested in tests/test_gpu_settings.py."""

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


def test_generative_federation_in_bf16_with_four_clients_on_one_gpu(tmp_path, flower_task):
    """The in-process generative federation (ClientApp handlers, no Ray) on the tiny Llama,
    device=cuda and bf16: the four clients share the process's one model on the one GPU."""
    from fedlora.run.server import prepare, run_server
    from tests.test_generation_federation import ClientAppGrid, sft_config
    from tests.test_generation_task import char_tokenizer, tiny_llama

    # Prepare
    folder, data_dir = tmp_path / "llama", tmp_path / "data"
    tokenizer = char_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data_dir.mkdir()
    rows = [json.dumps({"prompt": f"What is {a} + {a}?", "response": str(2 * a)}) + "\n"
            for a in range(12)]
    (data_dir / "train.jsonl").write_text("".join(rows[:8]))
    (data_dir / "test.jsonl").write_text("".join(rows[8:]))
    cfg = sft_config("fedavg", folder, data_dir, device="cuda", client_gpus=0.25,
                     precision="bf16", clients=4, clients_per_round=4)
    run_data, bundle = prepare(cfg)
    # Execute
    run_server(ClientAppGrid(4), cfg, tmp_path / "run", bundle, run_data)
    # Assert: the server's model is on the GPU, every client trained in both rounds
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert next(bundle.model.parameters()).device.type == "cuda"
    assert [r["clients_trained"] for r in rows[1:]] == [4, 4]
    assert all(r["train_loss"] > 0 and r["eval_loss"] > 0 for r in rows[1:])


def test_4bit_base_weights_load_and_train_their_adapters(tmp_path):
    """quantization=4: the Linear weights are bitsandbytes 4-bit, the adapters fp32 and trained."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from fedlora.clients.train import client_update
    from fedlora.model.pretrained import ModelSpec, build_model
    from tests.test_generation_task import char_tokenizer, tiny_llama

    # Prepare
    tokenizer = char_tokenizer()
    tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bundle = build_model(ModelSpec(name=str(tmp_path), task="sft", rank=4, alpha=8.0,
                                   targets=("q_proj", "v_proj"), quantization=4), "cuda")
    layer = bundle.model.get_submodule(bundle.adapted[0])
    trainable = bundle.set_trainable(("A", "B"))
    before = {k: v.clone() for k, v in bundle.state(("B",)).items()}
    ids = torch.tensor([tokenizer.encode("What is 2 + 2? 4")], device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    # Execute
    client_update(bundle.model, trainable, [batch, batch], lr=1e-2, device="cuda")
    # Assert
    assert isinstance(layer.base, bnb.nn.Linear4bit) and layer.lora_A.weight.dtype == torch.float32
    assert bundle.layer_shapes()[0] == (layer.base.out_features, layer.base.in_features)
    after = bundle.state(("B",))
    assert any(not torch.equal(after[k], before[k]) for k in before)
