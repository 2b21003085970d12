#!/usr/bin/env bash
# gpu_check.sh: fedlora's GPU path on one data-centre GPU, in under 8 minutes, with no network.
#
# Prints
#   1. a 2-round simulation (Flower on Ray) of every registered method on the generative task
#      (task=arithmetic), 4 clients sharing the GPU (client_gpus=0.25), precision=bf16;
#   2. step time and peak memory per client (torch.cuda.max_memory_allocated) at ~135M
#      parameters (SmolLM2-135M's shape) and ~1.2B (Llama-3.2-1B's shape), for fp32, bf16,
#      bf16 + grad_checkpointing and, with bitsandbytes installed, 4-bit NF4 base weights;
#   3. the bare-loop ratio: the same client steps through fedlora's client_update vs a plain
#      PyTorch loop (target <= 1.25);
#   4. clients per GPU (client_batch, docs/design/client-batching.md): K clients per pass
#      through one copy of the ~135M model (K = 1, 2, 4, ... until out of memory: client steps
#      per second and the allocator's peak) against fractional-GPU workers (each its own
#      process, CUDA context and copy of the model, one client: how many fit, from the
#      measured context and one client's peak, and their combined rate if they shared the GPU
#      perfectly, an upper bound). experiments/bench/RESULTS.md says "not measured" until a GPU
#      has run this.
# The models are RANDOM-INITIALISED LlamaConfigs of those shapes (the machine may have no
# network and too little room for real weights) with a one-token-per-character tokenizer:
# times and memory are the architecture's; exact match and losses mean nothing.
#
# Run it from anywhere:   bash experiments/bench/gpu_check.sh
# Environment: GPU_CHECK_DIR (scratch, default /tmp/fedlora-gpu-check; the ~1B folder takes
# 5 GB), GPU_CHECK_METHODS ("fedavg fedsb": a subset), GPU_CHECK_SMOKE=1 (a CPU dry run of the
# script itself with a tiny model, one method, one round: no numbers worth keeping).
#
# On a GPU machine without flwr, ray, opacus or hydra (torch, transformers, peft present) and
# without network: download their wheels elsewhere (`pip download flwr==1.39.0 ray==2.55.1
# opacus==1.6.0 hydra-core==1.3.8 flwr-datasets==0.6.1 -d wheels/`, for the GPU machine's Python
# and platform), carry wheels/ with the working tree, then there
#   pip install --no-index --find-links wheels/ flwr ray opacus hydra-core flwr-datasets
# (or unpack the wheels into one folder and put it on PYTHONPATH), and run this script.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${GPU_CHECK_DIR:-/tmp/fedlora-gpu-check}
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*"; }

if [ "$SMOKE" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); GPU_CHECK_SMOKE=1 runs a CPU dry run" >&2
  exit 2
fi

say "1/5 random-initialised models (NOT pretrained weights: timings and memory only)"
"$PY" - "$WORK" "$SMOKE" <<'PYTHON'
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_generation_task import char_tokenizer

work, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
tokenizer = char_tokenizer()
SHAPES = {  # SmolLM2-135M and Llama-3.2-1B (their config.json), tied embeddings
    "smollm2-135m-random": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                rope_theta=100000.0),
    "llama-1b-random": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            rope_theta=500000.0),
}
if smoke:
    SHAPES = {name: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer))
              for name in SHAPES}
for name, shape in SHAPES.items():
    folder = work / name
    if (folder / "config.json").is_file():
        continue
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"  {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          "random weights, char tokenizer")
PYTHON

say "2/5 every method, 2 rounds, 4 clients on one GPU (client_gpus=0.25, precision=bf16)"
METHODS=${GPU_CHECK_METHODS:-$("$PY" -c "from fedlora.strategies import STRATEGIES; print(' '.join(sorted(STRATEGIES)))")}
if [ "$SMOKE" = 1 ]; then
  METHODS=${GPU_CHECK_METHODS:-fedavg}
  PLACE="device=cpu rounds=1 local_steps=1 clients=2 clients_per_round=2 eval.max_examples=2"
else
  PLACE="device=cuda client_gpus=0.25 precision=bf16 rounds=2 local_steps=4 clients=4 clients_per_round=4 eval.max_examples=32"
fi
printf '  %-9s %-6s %8s %11s %10s %10s\n' method status wall_s exact_match eval_loss train_loss
for method in $METHODS; do
  out="$WORK/runs/$method"
  rm -rf "$out"
  begin=$(date +%s)
  # shellcheck disable=SC2086
  if timeout 150 "$PY" -m fedlora.simulate task=arithmetic "model=$WORK/smollm2-135m-random" \
      "strategy=$method" $PLACE batch_size=8 max_length=256 eval.max_new_tokens=4 \
      fedsb.init_samples=32 checkpoint_every=0 "out=$out" >"$WORK/$method.log" 2>&1; then
    status=ok
  else
    status="FAIL($?)"
  fi
  "$PY" - "$out/results.jsonl" "$method" "$status" "$(( $(date +%s) - begin ))" <<'PYTHON'
import json, sys
from pathlib import Path

path, method, status, wall = Path(sys.argv[1]), *sys.argv[2:]
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
last = rows[-1] if rows else {}
fmt = lambda key: f"{last[key]:.3f}" if key in last else "-"
print(f"  {method:<9} {status:<6} {wall:>8} {fmt('exact_match'):>11} {fmt('eval_loss'):>10} "
      f"{fmt('train_loss'):>10}")
PYTHON
  [ "$status" = ok ] || tail -n 5 "$WORK/$method.log" | sed 's/^/      /'
done

say "3/5 step time and peak memory per client; 4/5 bare-loop ratio"
"$PY" - "$WORK" "$SMOKE" <<'PYTHON'
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch

from fedlora.clients.train import client_update
from fedlora.model.pretrained import ModelSpec, build_model
from fedlora.tasks import make_task

work, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
device = "cpu" if smoke else "cuda"
BATCH, WARMUP, STEPS, MAX_LENGTH = (2, 1, 2, 256) if smoke else (16, 3, 10, 256)
task = make_task("arithmetic")


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def batches_for(bundle, count):
    examples = task.training_examples(bundle.tokenizer, MAX_LENGTH)
    rng = random.Random(0)
    return [examples.collate(rng.sample(range(len(examples.labels)), BATCH)) for _ in range(count)]


def timed_client(bundle, batches) -> tuple[float, float]:
    """(seconds per step after the warm-up, peak GiB) of client_update on ``batches``."""
    trainable = bundle.set_trainable(("A", "B"))
    client_update(bundle.model, trainable, batches[:WARMUP], 1e-4, device)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    client_update(bundle.model, trainable, batches[WARMUP:], 1e-4, device)
    sync()
    seconds = (time.perf_counter() - begin) / (len(batches) - WARMUP)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak


def bare_loop(bundle, batches) -> float:
    """The same steps in plain PyTorch: AdamW on the adapters, the task's loss, no fedlora."""
    trainable = bundle.set_trainable(("A", "B"))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    model, loss_of = bundle.model, task.loss
    model.train()
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    times = []
    for index, batch in enumerate(batches):
        sync()
        begin = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = loss_of(model, batch, "mean")
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        sync()
        if index >= WARMUP:
            times.append(time.perf_counter() - begin)
    return sum(times) / len(times)


settings = [("fp32", False, None), ("bf16", False, None), ("bf16", True, None)]
if device == "cuda" and importlib.util.find_spec("bitsandbytes"):
    settings.append(("bf16", False, 4))
else:
    print("  (4-bit rows skipped: " + ("no CUDA" if device != "cuda" else "bitsandbytes is not "
                                       "installed") + ")")
print(f"  batch {BATCH}, arithmetic prompts (char tokens, up to {MAX_LENGTH}), rank 16 on "
      "q_proj/v_proj, AdamW; RANDOM weights")
print(f"  {'model':<20} {'params':>8} {'precision':<9} {'ckpt':<5} {'4-bit':<5} "
      f"{'s/step':>7} {'peak GiB':>8}")
ratio_done = False
for name in ("smollm2-135m-random", "llama-1b-random"):
    for precision, checkpointing, quantization in settings:
        spec = ModelSpec(name=str(work / name), task="arithmetic", rank=16, alpha=32.0,
                         precision=precision, grad_checkpointing=checkpointing,
                         quantization=quantization)
        bundle = build_model(spec, device)
        params = sum(p.numel() for p in bundle.model.parameters())
        batches = batches_for(bundle, WARMUP + STEPS)
        seconds, peak = timed_client(bundle, batches)
        print(f"  {name:<20} {params / 1e6:>6.1f}M {precision:<9} {str(checkpointing):<5} "
              f"{str(quantization is not None):<5} {seconds:>7.4f} {peak:>8.2f}", flush=True)
        if precision == "bf16" and not checkpointing and quantization is None and not ratio_done:
            ratio_done = True
            bare = bare_loop(bundle, batches)
            print(f"  bare-loop ratio ({name}, bf16): client_update {seconds:.4f} s/step vs plain "
                  f"loop {bare:.4f} s/step = {seconds / bare:.2f} (target <= 1.25)", flush=True)
        del bundle
        if device == "cuda":
            torch.cuda.empty_cache()
PYTHON
say "5/5 clients per GPU: K clients per pass vs fractional-GPU workers"
"$PY" - "$WORK" "$SMOKE" <<'PYTHON'
import random
import sys
import time
from pathlib import Path

import torch

from fedlora.clients.batched import ClientSteps, RandomStream, train_together
from fedlora.clients.train import client_update
from fedlora.model.adapters import part_of
from fedlora.model.pretrained import ModelSpec, build_model
from fedlora.tasks import make_task

work, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
device = "cpu" if smoke else "cuda"
BATCH, STEPS, MAX_LENGTH = (2, 2, 256) if smoke else (8, 4, 256)
GIB = 2**30
task = make_task("arithmetic")
if device == "cuda":  # this process's CUDA context: what the device lost before any tensor
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context_gib = (total - free) / GIB
    total_gib = total / GIB
spec = ModelSpec(name=str(work / "smollm2-135m-random"), task="arithmetic", rank=16, alpha=32.0,
                 precision="bf16")
bundle = build_model(spec, device)
examples = task.training_examples(bundle.tokenizer, MAX_LENGTH)
rng = random.Random(0)
keys = [k for k in bundle.shapes() if part_of(k, bundle.head_keys) in ("A", "B")]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_peak():
    sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():  # what the caching allocator held at most: a worker's memory besides its context
    return torch.cuda.max_memory_reserved() / GIB if device == "cuda" else float("nan")


def client_steps(count):
    return [ClientSteps(bundle.state(("A", "B")), [rng.sample(range(len(examples)), BATCH)
                                                  for _ in range(STEPS)], 1e-4, 1e-4,
                        RandomStream.capture(device)) for _ in range(count)]


# A fractional-GPU worker (client_gpus=1/N) is a process with its own CUDA context and copy of
# the model, training one client at a time: its footprint is its context plus the peak its
# allocator reserves for one client; N such workers fit while N footprints fit the device.
fresh_peak()
trainable = bundle.set_trainable(("A", "B"))
steps = client_steps(1)[0].steps
client_update(bundle.model, trainable, [examples.collate(s) for s in steps], 1e-4, device)
sync()
begin = time.perf_counter()
client_update(bundle.model, trainable, [examples.collate(s) for s in steps], 1e-4, device)
sync()
alone_s = (time.perf_counter() - begin) / STEPS
if device == "cuda":
    footprint = context_gib + peak_gib()
    workers = int(total_gib // footprint)
    print(f"  fractional workers: one client {alone_s:.4f} s/step; footprint {footprint:.2f} GiB "
          f"(context {context_gib:.2f} + allocator peak {peak_gib():.2f}): {workers} workers fit "
          f"in {total_gib:.0f} GiB (client_gpus=1/{workers}); if they shared the GPU perfectly, "
          f"{workers / alone_s:.1f} client steps/s (an upper bound: they time-slice one GPU)",
          flush=True)
else:
    workers = 1
    print(f"  fractional workers (CPU dry run): one client {alone_s:.4f} s/step", flush=True)
print(f"  {'K per pass':>10} {'s/step':>8} {'client steps/s':>15} {'peak GiB':>9}")
best, k = (0.0, 0), 1
while True:
    try:
        fresh_peak()
        clients = client_steps(k)
        train_together(bundle.model, bundle.head_keys, keys, client_steps(k), examples,
                       task.loss, "adamw", device)  # warm-up
        sync()
        begin = time.perf_counter()
        train_together(bundle.model, bundle.head_keys, keys, clients, examples, task.loss,
                       "adamw", device)
        sync()
        seconds = (time.perf_counter() - begin) / STEPS
    except torch.cuda.OutOfMemoryError:
        print(f"  {k:>10} out of memory: at most {k // 2} clients per pass at batch {BATCH} "
              f"(one process, one context)")
        break
    print(f"  {k:>10} {seconds:>8.4f} {k / seconds:>15.1f} {peak_gib():>9.2f}", flush=True)
    best = max(best, (k / seconds, k))
    if smoke and k >= 2 or k >= 512:
        break
    k *= 2
print(f"  clients per GPU: K per pass, best {best[0]:.1f} client steps/s at K={best[1]}; "
      f"fractional workers: {workers} fit, at most {workers / alone_s:.1f} client steps/s")
PYTHON
say "done"
