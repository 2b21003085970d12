"""The GPU-related settings on a CPU: precision (auto, bf16 autocast, DP-SGD under it),
gradient checkpointing, and the refusals of quantization=4 (bitsandbytes, CUDA only). The GPU
runs themselves are in tests/test_gpu.py (marked ``gpu``, skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedlora.model.adapters import LoRALinear, lora_layers
from fedlora.clients.train import base_gradient_sum, client_update
from fedlora.config import RunConfig, client_config, specs_from_client_config
from fedlora.core.errors import ConfigError
from fedlora.model.pretrained import (AdaptedModel, ModelSpec, build_model, chosen_precision,
                                      cpu_bf16_flags, fast_bf16)
from fedlora.run.server import prepare, run_server
from tests.test_generation_federation import (CLIENTS, ROUNDS, ClientAppGrid, llama_folder,  # noqa: F401
                                              sft_config, sft_data)


def sft_batch(bundle, sft_data, count: int = 3) -> dict:  # noqa: F811
    """The first ``count`` training examples of the tiny SFT data, collated as clients do."""
    from fedlora.tasks.data import DataSpec
    from fedlora.tasks import make_task

    task = make_task("sft", DataSpec(path=str(sft_data)))
    return task.training_examples(bundle.tokenizer, 48).collate(list(range(count)))


def tiny_bundle(llama_folder, **spec) -> AdaptedModel:  # noqa: F811
    """The tiny Llama with q_proj/v_proj adapters and a non-zero B (else B's gradient alone
    would be tested: A's is zero while B = 0)."""
    bundle = build_model(ModelSpec(name=str(llama_folder), task="sft", rank=4, alpha=8.0,
                                   targets=("q_proj", "v_proj"), **spec))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(bundle.model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    return bundle


def adapter_gradients(bundle, batch) -> tuple[float, dict[str, torch.Tensor]]:
    bundle.model.train()
    loss = bundle.model.task_loss(bundle.model, batch, "mean")
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in bundle.model.named_parameters()
                         if p.requires_grad}


# ----------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(llama_folder, sft_data):  # noqa: F811
    # Prepare: the same model and batch, built with and without checkpointing
    plain = tiny_bundle(llama_folder)
    checkpointed = tiny_bundle(llama_folder, grad_checkpointing=True)
    batch = sft_batch(plain, sft_data)
    # Execute
    loss_plain, grads_plain = adapter_gradients(plain, batch)
    loss_ckpt, grads_ckpt = adapter_gradients(checkpointed, batch)
    # Assert: checkpointing is on, every A and B gets a non-zero gradient, equal to ~1e-6
    flag = "is_activation_checkpointing"  # transformers >= 5; is_gradient_checkpointing before
    checkpointing = [getattr(b.model, flag) if hasattr(b.model, flag)
                     else b.model.is_gradient_checkpointing for b in (checkpointed, plain)]
    assert checkpointing == [True, False]
    assert sorted(grads_ckpt) == sorted(grads_plain) and len(grads_plain) == 2 * 2 * 2
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-6)
    for key, grad in grads_plain.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_on_cpu_trains_in_bfloat16_with_a_loss_close_to_fp32(llama_folder,  # noqa: F811
                                                                          sft_data):  # noqa: F811
    # Prepare: fp32 and bf16 bundles from the same weights, and what dtype q_proj computes in
    runs = {}
    for precision in ("fp32", "bf16"):
        bundle = tiny_bundle(llama_folder, precision=precision)
        seen = []
        layer = bundle.model.get_submodule(bundle.adapted[0])
        layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        trainable = bundle.set_trainable(("A", "B"))
        batch = sft_batch(bundle, sft_data)
        # Execute: two AdamW steps on the same batch
        metrics = client_update(bundle.model, trainable, [batch, batch], lr=1e-3)
        runs[precision] = (metrics, seen, trainable)
    # Assert: bf16 ran its matmuls in bfloat16, kept fp32 weights, and lost < 2 % in the loss
    (fp32, seen32, _), (bf16, seen16, params16) = runs["fp32"], runs["bf16"]
    assert set(seen32) == {torch.float32} and set(seen16) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in params16)
    assert bf16["train_loss"] != fp32["train_loss"]
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=2e-2)


def test_bf16_and_checkpointing_through_the_server_loop_and_the_client_app(llama_folder, sft_data,  # noqa: F811
                                                                         tmp_path, flower_task):
    # Prepare: the generative federation of the task tests, in bf16 with checkpointing
    cfg = sft_config("fedavg", llama_folder, sft_data, precision="bf16", grad_checkpointing=True)
    data, bundle = prepare(cfg)
    # Execute
    summary = run_server(ClientAppGrid(CLIENTS), cfg, tmp_path, bundle, data)
    # Assert: every round trained and was scored, the settings reached the clients' model
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows[1:]] == [CLIENTS] * ROUNDS
    assert all(r["train_loss"] > 0 and r["eval_loss"] > 0 for r in rows[1:])
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"]
    spec, _ = specs_from_client_config(client_config(cfg, 1))
    assert (spec.precision, spec.grad_checkpointing, spec.quantization) == ("bf16", True, None)
    assert bundle.model.autocast_dtype is torch.bfloat16
    assert summary["precision"] == {"requested": "bf16", "chosen": "bf16",
                                    "bf16_hardware": fast_bf16("cpu")}


# ----------------------------------------------------------------------------- precision=auto

CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse2 avx2 avx512f {}\n\n"


def test_auto_precision_is_bf16_on_a_cpu_with_amx_or_avx512_bf16_and_fp32_elsewhere():
    # Prepare: /proc/cpuinfo texts of a Sapphire Rapids, a Cooper Lake, a Skylake Xeon, and
    # one where the flag's name is only part of another word
    texts = {"spr": CPUINFO.format("avx512_bf16 amx_bf16 amx_tile"),
             "cpx": CPUINFO.format("avx512_bf16"), "skx": CPUINFO.format("avx512bw"),
             "lookalike": CPUINFO.format("xamx_bf16x"), "no flags line": "processor\t: 0\n"}
    # Execute
    flags = {name: cpu_bf16_flags(text) for name, text in texts.items()}
    chosen = {(requested, hardware): chosen_precision(requested, hardware)
              for requested in ("auto", "fp32", "bf16") for hardware in (None, "cpu: amx_bf16")}
    # Assert
    assert flags == {"spr": ["amx_bf16", "avx512_bf16"], "cpx": ["avx512_bf16"], "skx": [],
                     "lookalike": [], "no flags line": []}
    assert chosen == {("auto", None): "fp32", ("auto", "cpu: amx_bf16"): "bf16",
                      ("fp32", None): "fp32", ("fp32", "cpu: amx_bf16"): "fp32",
                      ("bf16", None): "bf16", ("bf16", "cpu: amx_bf16"): "bf16"}
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        chosen_precision("fp16", None)


def test_auto_is_the_default_and_the_model_autocasts_as_this_machine_chooses(llama_folder):  # noqa: F811
    # Prepare: what this machine has, from /proc/cpuinfo read independently of fedlora
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    fast = "amx_bf16" in flags or "avx512_bf16" in flags
    # Execute
    cfg = RunConfig.from_dict({})
    bundle = tiny_bundle(llama_folder, precision="auto")
    # Assert
    assert cfg.precision == "auto" and cfg.model_spec(2).precision == "auto"
    assert bundle.precision["chosen"] == ("bf16" if fast else "fp32")
    assert bundle.model.autocast_dtype is (torch.bfloat16 if fast else None)
    assert (bundle.precision["bf16_hardware"] is not None) == fast
    if not torch.cuda.is_available():
        assert fast_bf16("cuda") is None


# ----------------------------------------------------------------------------- DP-SGD under bf16


@pytest.mark.parametrize("noise", ["reproducible", "secret"])
def test_dp_clips_bf16_per_example_gradients_with_fp32_norms(noise):
    # Prepare: one example whose bf16 gradient has norm 4.0156, which bf16 rounds down to 4.0:
    # a clip factor from the rounded norm would leave it 0.39 % longer than C (both noise
    # sources' optimisers clip alike)
    from fedlora.privacy.randomness import KeyStream, make_dp_optimizer

    param = nn.Parameter(torch.zeros(2))
    source = torch.Generator() if noise == "reproducible" else KeyStream.from_os()
    optimizer = make_dp_optimizer(torch.optim.SGD([param], lr=0.0), noise_multiplier=0.0,
                                  clip=1.0, expected_batch_size=1, noise=source)
    param.grad_sample = torch.tensor([[0.5, 3.984375]], dtype=torch.bfloat16)
    # Execute: clipping, no noise, the mean over the one example
    optimizer.step()
    # Assert: the released gradient is the example's, clipped to norm C in fp32
    assert param.grad.dtype == torch.float32
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(1.0, abs=1e-6)
    expected = torch.tensor([0.5, 3.984375]) / torch.tensor([0.5, 3.984375]).norm()
    torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-7)


def test_dp_sgd_under_bf16_autocast_trains_like_fp32_with_the_same_noise(llama_folder,  # noqa: F811
                                                                        sft_data):  # noqa: F811
    # Prepare: fp32 and bf16 bundles from the same weights, DP-SGD with the same noise seed
    from fedlora.clients.dp import ClientPrivacy

    updates = {}
    for precision in ("fp32", "bf16"):
        bundle = tiny_bundle(llama_folder, precision=precision)
        trainable = bundle.set_trainable(("A", "B"))
        batch = sft_batch(bundle, sft_data)
        before = bundle.state(("A", "B"))
        privacy = ClientPrivacy(target_epsilon=8.0, delta=1e-5, clip=0.5, accountant="rdp",
                                noise_multiplier=0.3, sample_rate=0.5, batch_size=3,
                                noise_generator=torch.Generator().manual_seed(1))
        # Execute: two DP-SGD steps (AdamW) on the same batch
        client_update(bundle.model, trainable, [batch, batch], lr=1e-3, privacy=privacy)
        after = bundle.state(("A", "B"))
        updates[precision] = torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)])
    # Assert: the record-level DP config is accepted, and bf16's update is fp32's up to bf16
    # rounding of the per-example gradients (the clipping and the noise are the same)
    assert RunConfig.from_dict({"precision": "bf16", "dp": {"epsilon": 8}}).precision == "bf16"
    fp32, bf16 = updates["fp32"], updates["bf16"]
    assert fp32.abs().max() > 0 and not torch.equal(fp32, bf16)
    assert torch.linalg.vector_norm(bf16 - fp32) < 0.05 * torch.linalg.vector_norm(fp32)


# ----------------------------------------------------------------------------- refusals

CUDA = {"device": "cuda", "client_gpus": 0.25}
REFUSED = {
    "4-bit on cpu": ({"quantization": 4}, ["quantization=4", "needs a CUDA GPU",
                                           "or quantization=null"]),
    "4-bit with a method that moves the base": (
        {"quantization": 4, "strategy": "fedex", **CUDA},
        ["quantization=4: strategy=fedex adds to the base weights", "quantization=null"]),
    "4-bit with a merged export": ({"quantization": 4, "export": {"merge": True}, **CUDA},
                                   ["export.merge=true would fold", "set export.merge=false"]),
    "8-bit": ({"quantization": 8}, ["quantization '8' is unknown", "choose one of: 4"]),
    "fp16": ({"precision": "fp16"}, ["precision 'fp16' is unknown", "auto, fp32, bf16"]),
    "checkpointing with DP-SGD": ({"grad_checkpointing": True, "dp": {"epsilon": 8}},
                                  ["grad_checkpointing=true with record-level DP",
                                   "grad_checkpointing=false"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_gpu_settings_that_cannot_work_are_one_line_config_errors(case):
    raw, expected = REFUSED[case]
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(raw)
    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_4bit_without_bitsandbytes_names_the_package():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ConfigError, match=r"quantization=4 needs the bitsandbytes package; pip "
                                          r"install bitsandbytes"):
        RunConfig.from_dict({"quantization": 4, **CUDA})


def test_a_packed_base_weight_is_refused_by_base_deltas_and_base_gradients():
    # Prepare: a model whose second adapted layer has a packed uint8 weight, as bitsandbytes'
    # Linear4bit holds it (its Linear features say the real shape)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    model[1].weight = nn.Parameter(torch.zeros(10, 1, dtype=torch.uint8), requires_grad=False)
    model[0], model[1] = LoRALinear(model[0], 2, 4.0, False), LoRALinear(model[1], 2, 4.0, False)
    # Execute
    bundle = AdaptedModel.from_adapted(model, None, ["0", "1"], frozenset())
    # Assert: fp32 factors for the packed layer, real shapes, no stored base, clear refusals
    assert model[1].lora_A.weight.dtype == torch.float32
    assert bundle.layer_shapes() == [(5, 6), (4, 5)]
    assert list(bundle.pretrained_base) == ["0"]
    bundle.set_base_delta(None)  # nothing to add: fine
    with pytest.raises(ConfigError, match=r"quantised \(quantization=4\).*set quantization=null"):
        bundle.set_base_delta({"0": torch.ones(5, 6)})
    with pytest.raises(ValueError, match=r"1.weight is quantised \(quantization=4\)"):
        base_gradient_sum(model, {"1.weight": model[1].base.weight}, [])
