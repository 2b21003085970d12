"""A client's local step time: fp32 vs precision=auto, and the causal LM's full vs response-only head.

    python experiments/bench/step_time.py [--strategies fedavg,fedsb] [--steps 20]
        [--gen-strategies fedsb] [--gen-steps 4] [--threads 1] [--repeats 2]

Every number is ``fedlora.clients.train.client_update`` (what a client runs) on the same fixed
batches, the strategy's default rank and trained parts, each variant timed ``--repeats`` times
in turn with the others (the least disturbed time kept), all in one process, so the ratios
compare like with like on a shared machine:

* the default task (``task=topic``: all-MiniLM-L6-v2, batch 16, max_length 32): fp32 and
  ``auto`` (what this machine chooses: bf16 autocast where the CPU has AMX or AVX-512 BF16),
  without DP and with record-level DP-SGD (Opacus; its clipping and noise stay fp32);
* the generative default (``task=arithmetic``: SmolLM2-135M-Instruct, batch 8, prompt plus
  worked solution, ~50-110 tokens): fp32 and ``auto``, each with the LM head on every position
  (the full head: ``response_head_applies`` off) and on the response positions only.

Prints one JSON line per strategy and task with the seconds per step and the ratios
(fp32 / auto: the speed-up of ``auto``), and the machine: the CPU's model name and its bf16
flags, torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch


def machine(threads: int) -> str:
    from fedlora.model.pretrained import fast_bf16

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}; bf16: {fast_bf16('cpu') or 'none'}; {threads} torch thread(s)"


def setup(task: str, strategy: str, steps: int):
    """``(cfg, bundle, batches, trained parts)``: the strategy's default adapters on the task's
    default model, fp32, and ``steps`` seeded training batches of the task's default size."""
    from fedlora.config import RunConfig
    from fedlora.model.pretrained import build_model
    from fedlora.strategies import get_strategy

    cfg = RunConfig.from_dict({"strategy": strategy, "task": task, "precision": "fp32"})
    data = cfg.task_spec().dataset()
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = cfg.task_spec().training_examples(bundle.tokenizer, cfg.max_length)
    batches = list(train.sample_steps(list(range(len(train))), cfg.batch_size, steps,
                                      random.Random(0)))
    return cfg, bundle, batches, get_strategy(strategy).trained_parts


def timed(bundle, trained, batches, lr: float, variants: dict, repeats: int) -> dict:
    """Seconds per step of each variant (``name -> (autocast dtype, response head, privacy)``),
    the least of ``repeats`` runs, the variants taking turns; one untimed warm-up step each."""
    from fedlora.clients.train import client_update

    seconds = {name: float("inf") for name in variants}
    for attempt in range(repeats + 1):
        for name, (dtype, response_head, privacy) in variants.items():
            bundle.model.autocast_dtype = dtype
            bundle.model.response_head_applies = response_head
            bundle.load(bundle.initial_state)
            trainable = bundle.set_trainable(trained)
            steps = batches[:1] if attempt == 0 else batches
            begin = time.perf_counter()
            client_update(bundle.model, trainable, steps, lr,
                          privacy=privacy() if privacy else None)
            if attempt:
                seconds[name] = min(seconds[name], (time.perf_counter() - begin) / len(steps))
    return {name: round(s, 4) for name, s in seconds.items()}


def dp_settings(batch_size: int):
    """A fresh record-level DP state per run (as dp_step_time.py: sigma 1, C 1)."""
    from fedlora.clients.dp import ClientPrivacy

    return lambda: ClientPrivacy(target_epsilon=8.0, delta=1e-5, clip=1.0, accountant="rdp",
                                 noise_multiplier=1.0, sample_rate=batch_size / 15,
                                 batch_size=batch_size,
                                 noise_generator=torch.Generator().manual_seed(0))


def classification(strategy: str, steps: int, repeats: int, auto) -> dict:
    cfg, bundle, batches, trained = setup("topic", strategy, steps)
    dp = dp_settings(cfg.batch_size)
    s = timed(bundle, trained, batches, cfg.lr, {
        "fp32": (None, False, None), "auto": (auto, False, None),
        "dp_fp32": (None, False, dp), "dp_auto": (auto, False, dp)}, repeats)
    return {"task": "topic", "strategy": strategy, "rank": cfg.rank,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length,
            "steps": steps, "step_s": s,
            "speedup_auto": round(s["fp32"] / s["auto"], 3),
            "speedup_auto_dp": round(s["dp_fp32"] / s["dp_auto"], 3),
            "dp_over_plain_fp32": round(s["dp_fp32"] / s["fp32"], 3),
            "dp_over_plain_auto": round(s["dp_auto"] / s["auto"], 3)}


def generation(strategy: str, steps: int, repeats: int, auto) -> dict:
    from fedlora.tasks.generation import IGNORE_INDEX

    cfg, bundle, batches, trained = setup("arithmetic", strategy, steps)
    if not bundle.model.response_head_applies:
        raise SystemExit("the model's logits are not head(hidden): no response-only head here")
    s = timed(bundle, trained, batches, cfg.lr, {
        "fp32_full_head": (None, False, None), "fp32_response_head": (None, True, None),
        "auto_full_head": (auto, False, None), "auto_response_head": (auto, True, None)},
        repeats)
    positions = sum(b["input_ids"].numel() for b in batches)
    responses = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return {"task": "arithmetic", "strategy": strategy, "rank": cfg.rank,
            "batch_size": cfg.batch_size, "tokens_per_example": round(positions / steps / cfg.batch_size, 1),
            "response_share": round(responses / positions, 3), "steps": steps, "step_s": s,
            "speedup_response_head_fp32": round(s["fp32_full_head"] / s["fp32_response_head"], 3),
            "speedup_response_head_auto": round(s["auto_full_head"] / s["auto_response_head"], 3),
            "speedup_auto_full_head": round(s["fp32_full_head"] / s["auto_full_head"], 3),
            "speedup_auto_response_head": round(s["fp32_response_head"] / s["auto_response_head"], 3),
            "speedup_both": round(s["fp32_full_head"] / s["auto_response_head"], 3)}


def main() -> None:
    from fedlora.model.pretrained import AUTOCAST_DTYPES, chosen_precision, fast_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="fedavg,fedsb", help="default task; '' skips it")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gen-strategies", default="fedsb", help="arithmetic; '' skips it")
    parser.add_argument("--gen-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = chosen_precision("auto", fast_bf16("cpu"))
    auto = AUTOCAST_DTYPES[chosen]
    where = {"machine": machine(args.threads), "auto_chooses": chosen}
    for strategy in filter(None, args.strategies.split(",")):
        print(json.dumps({**where, **classification(strategy, args.steps, args.repeats, auto)}),
              flush=True)
    for strategy in filter(None, args.gen_strategies.split(",")):
        print(json.dumps({**where, **generation(strategy, args.gen_steps, args.repeats, auto)}),
              flush=True)


if __name__ == "__main__":
    main()
