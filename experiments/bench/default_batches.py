"""What the step-time benchmarks share: the default model and fixed batches of the default task."""

from __future__ import annotations

import random


def default_model_and_batches(strategy: str, steps: int, batch_size: int, max_length: int):
    """``(cfg, bundle, batches, trained parts)``: the strategy's default adapters on
    all-MiniLM-L6-v2 and ``steps`` fixed-size training batches of the default task (seeded)."""
    from fedlora.config import RunConfig
    from fedlora.model.pretrained import build_model
    from fedlora.strategies import get_strategy
    from fedlora.tasks.classification import Batches, load_dataset

    cfg = RunConfig.from_dict({"strategy": strategy, "batch_size": batch_size,
                               "max_length": max_length})
    data = load_dataset(cfg.data)
    bundle = build_model(cfg.model_spec(data.num_labels))
    train = Batches(bundle.tokenizer, data.train.texts, data.train.labels, cfg.max_length)
    batches = list(train.sample_steps(list(range(len(train))), batch_size, steps, random.Random(0)))
    return cfg, bundle, batches, get_strategy(strategy).trained_parts
