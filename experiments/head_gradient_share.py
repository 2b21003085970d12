"""How much of a clipped per-example gradient is the classifier head's, at the start of training.

    python experiments/head_gradient_share.py [--strategy fedavg] [--examples 96] [KEY=VALUE ...]

Builds the run's model exactly as a client does (RunConfig from KEY=VALUE, e.g. the record-level
DP sweep's data keys), makes the method's trained parts trainable, and takes each of
``--examples`` random training examples' gradient (eval mode: no dropout). Prints one JSON line:
the median per-example norm, the median norm of its head part, the head's share of the norm, and
the norm of the mean gradient clipped at C = 1 (all of it, and its head part). Why it matters
(docs/privacy.md, "Tuning DP-SGD"): DP-SGD's noise is spread evenly over every trained
coordinate, while the signal here sits in the head.

    python experiments/head_gradient_share.py data.path=experiments/data/language_id.jsonl \\
        data.text_field=sentence data.label_field=language
"""

import argparse
import json
import random

import torch
from flwr.common.config import unflatten_dict

from fedlora.config import RunConfig
from fedlora.model.pretrained import build_model
from fedlora.strategies import get_strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("keys", nargs="*", help="KEY=VALUE run settings")
    args = parser.parse_args()

    cfg = RunConfig.from_dict({"strategy": args.strategy, "seed": args.seed,
                               **unflatten_dict(dict(k.split("=", 1) for k in args.keys))})
    task = cfg.task_spec()
    data = task.dataset()
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = task.training_examples(bundle.tokenizer, cfg.max_length)
    trainable = bundle.set_trainable(get_strategy(cfg.strategy).trained_parts)
    is_head = torch.cat([torch.full((p.numel(),), key in bundle.head_keys)
                         for key, p in bundle.model.named_parameters() if p.requires_grad])
    bundle.model.eval()
    grads = []
    for i in random.Random(args.seed).sample(range(len(train)), args.examples):
        loss = task.loss(bundle.model, train.collate([i]), "mean")
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainable)]))
    grads = torch.stack(grads)
    norms = grads.norm(dim=1)
    clipped_mean = (grads * torch.clamp(1.0 / norms, max=1.0)[:, None]).mean(0)
    print(json.dumps({
        "strategy": cfg.strategy, "trained": int(is_head.numel()), "head": int(is_head.sum()),
        "median_norm": round(norms.median().item(), 4),
        "median_head_norm": round(grads[:, is_head].norm(dim=1).median().item(), 4),
        "head_share_of_norm": round((grads[:, is_head].norm(dim=1) / norms).median().item(), 4),
        "clipped_mean_norm": round(clipped_mean.norm().item(), 4),
        "clipped_mean_head_norm": round(clipped_mean[is_head].norm().item(), 4)}))


if __name__ == "__main__":
    main()
