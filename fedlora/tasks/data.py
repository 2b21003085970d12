"""Data a task reads, the fixed train/test split, client partitions and batching: the parts
every task shares (``fedlora.tasks``: each task reads its own fields and tokenises its own way).

* ``data.path``: a directory with ``train`` and ``test`` files (``.jsonl`` or ``.csv``), or one
  such file that is split by ``data.test_fraction``. The split is fixed and independent of any
  seed: an example is in the test split iff the first 8 bytes of ``sha1(key)`` (its text or
  prompt), as a big-endian integer, mod 10 000 are below ``test_fraction * 10 000``
  (``in_test_split``).
* ``data.name``: a Hugging Face dataset id loaded with ``datasets`` (needs network access).

Every example has an integer label that partitions split on (a classification task's class, a
generative task's problem type). Partitions over clients come from flwr-datasets partitioners
(IID, Dirichlet over labels, and pathological: k labels per client).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedlora.core.errors import ConfigError
from fedlora.core.settings import OPEN_UNIT_INTERVAL, setting


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from (the ``data.*`` config section); hashable so each process
    loads it once."""

    path: str | None = setting(None, "a folder with train/test .jsonl|.csv files, or one such "
                               "file split by test_fraction")
    name: str | None = setting(None, "a Hugging Face dataset id (needs network)")
    text_field: str = setting("text", "the column holding the text")
    label_field: str = setting("label", "the column holding the label (generative tasks: "
                               "optional, the partition label)")
    prompt_field: str = setting("prompt", "generative tasks: the column holding the prompt (a "
                                "row with a 'messages' list is a chat instead)")
    response_field: str = setting("response", "generative tasks: the column holding the "
                                  "response")
    test_fraction: float = setting(0.2, "share of a single file held out for testing",
                                   check=OPEN_UNIT_INTERVAL)


def in_test_split(text: str, test_fraction: float) -> bool:
    """The fixed split rule: a stable hash of the text, independent of order and seed."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 10_000
    return bucket < round(test_fraction * 10_000)


def split_by_hash(texts: list[str], labels: list, test_fraction: float):
    """(train, test) as (texts, labels) pairs of lists, by ``in_test_split`` of each text."""
    train, test = ([], []), ([], [])
    for text, label in zip(texts, labels):
        side = test if in_test_split(text, test_fraction) else train
        side[0].append(text)
        side[1].append(label)
    return train, test


def encode_labels(train_labels: list, test_labels: list) -> tuple[list[int], list[int], tuple[str, ...]]:
    """Map raw labels (strings or ints) to 0..C-1 in sorted order of the raw values."""
    raw = sorted(set(train_labels) | set(test_labels), key=lambda v: (isinstance(v, str), v))
    index = {value: i for i, value in enumerate(raw)}
    return [index[v] for v in train_labels], [index[v] for v in test_labels], tuple(str(v) for v in raw)


def read_rows(file: Path) -> list[tuple[int, dict]]:
    """The rows of a .jsonl or .csv file, each with its line number (1-based) for messages."""
    if file.suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"data.path file '{file}' must end in .jsonl or .csv")
    rows: list[tuple[int, dict]] = []
    try:
        with file.open(encoding="utf-8", newline="" if file.suffix == ".csv" else None) as f:
            if file.suffix == ".csv":
                reader = csv.DictReader(f)
                for row in reader:
                    rows.append((reader.line_num, row))
                return rows
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"data.path file '{file}' line {number} is not valid JSON "
                                      f"({error.msg}, column {error.colno}); fix that line: one "
                                      "JSON object per line") from error
                if not isinstance(row, dict):
                    raise ConfigError(f"data.path file '{file}' line {number} is a JSON "
                                      f"{type(row).__name__}, not an object; write one "
                                      '{"text": ..., "label": ...} object per line')
                rows.append((number, row))
    except UnicodeDecodeError as error:
        raise ConfigError(f"data.path file '{file}' is not UTF-8 text (byte {error.start} after "
                          f"{len(rows)} rows: {error.reason}); save it as UTF-8") from error
    except csv.Error as error:
        raise ConfigError(f"data.path file '{file}' is not valid CSV ({error}); fix it or "
                          "convert it to .jsonl") from error
    return rows


def find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".csv"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def split_files(spec: DataSpec) -> tuple[tuple[list, str], tuple[list, str] | None]:
    """The rows of ``data.path``: ``((train rows, where), (test rows, where) or None)``; None:
    one file or no test file, to be split by ``data.test_fraction``."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path='{spec.path}' does not exist; give a directory with "
                          "train/test .jsonl or .csv files, or one such file")
    if not path.is_dir():
        return (read_rows(path), str(path)), None
    train_file, test_file = find_split_file(path, "train"), find_split_file(path, "test")
    if train_file is None:
        raise ConfigError(f"data.path='{spec.path}' has no train.jsonl or train.csv; add one "
                          "(and test.jsonl/test.csv, or it is split by data.test_fraction)")
    test = None if test_file is None else (read_rows(test_file), str(test_file))
    return (read_rows(train_file), str(train_file)), test


# --------------------------------------------------------------------------------------------
# Partitions over clients


def partition_indices(labels: tuple[int, ...], num_partitions: int, scheme: str, alpha: float,
                      seed: int, labels_per_client: int = 2) -> list[list[int]]:
    """Indices of the training examples held by each client, from flwr-datasets partitioners.

    ``iid``: equal-size random shards. ``dirichlet``: per-label Dirichlet(alpha) proportions
    over clients (smaller alpha = more skew), every client keeping at least one example.
    ``pathological``: each client holds exactly ``labels_per_client`` labels (McMahan et al.'s
    shards; ``PathologicalPartitioner`` in its paper's ``first-deterministic`` mode: client i's
    first label is i mod C, the others random), a label's examples split evenly over the
    clients holding it.
    """
    import datasets
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner)

    if num_partitions > len(labels):
        raise ConfigError(f"clients={num_partitions} exceeds the {len(labels)} training examples; "
                          "use fewer clients")
    table = datasets.Dataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=alpha, min_partition_size=1, self_balancing=False,
                                           shuffle=True, seed=seed)
    elif scheme == "pathological":
        num_labels = len(set(labels))
        if not 1 <= labels_per_client <= num_labels:
            raise ConfigError(f"partition.labels_per_client={labels_per_client} must be in "
                              f"1..{num_labels} (the number of labels)")
        partitioner = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                              num_classes_per_partition=labels_per_client,
                                              class_assignment_mode="first-deterministic",
                                              shuffle=True, seed=seed)
    else:
        raise ConfigError(f"partition '{scheme}' is unknown; choose one of: iid, dirichlet, "
                          "pathological")
    partitioner.dataset = table
    try:
        partitions = [sorted(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]
    except ValueError as error:  # e.g. a label held by more clients than it has examples
        raise ConfigError(f"partition={scheme} with clients={num_partitions} cannot be built "
                          f"({str(error).split('. ')[0]}); use fewer clients or change "
                          "partition.labels_per_client") from error
    empty = [i for i, p in enumerate(partitions) if not p]
    if empty:
        raise ConfigError(f"partition={scheme} leaves {len(empty)} of {num_partitions} clients "
                          f"without examples (e.g. client {empty[0]}); use fewer clients or raise "
                          "partition.labels_per_client")
    return partitions


@lru_cache(maxsize=8)
def client_partitions(task, num_partitions: int, partition, seed: int
                      ) -> tuple[tuple[int, ...], ...]:
    """Each client's training indices under ``partition`` (``fedlora.config.PartitionConfig``),
    split on the labels of ``task``'s training split (``fedlora.tasks.Task``). Cached per
    process: every virtual client on a Ray worker reuses one computation."""
    labels = tuple(task.dataset().train.labels)
    return tuple(tuple(p) for p in partition_indices(labels, num_partitions, partition.name,
                                                      partition.alpha, seed,
                                                      partition.labels_per_client))


# --------------------------------------------------------------------------------------------
# Batches (dynamic padding: a batch is padded to its own longest example)


class ExampleBatches:
    """Tokenised examples of one split; a task's subclass says how indices become a batch
    (``collate``). ``labels``: each example's integer partition label."""

    labels: torch.Tensor

    def __len__(self) -> int:
        raise NotImplementedError

    def collate(self, indices) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def epoch(self, indices, batch_size: int, rng: random.Random | None = None):
        """Yield batches over ``indices`` (shuffled with ``rng`` if given)."""
        order = list(indices)
        if rng is not None:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start:start + batch_size])

    def sample_steps(self, indices, batch_size: int, steps: int, rng: random.Random):
        """``steps`` batches drawn by cycling through reshuffled passes over ``indices``."""
        if not indices:
            raise ValueError("a client with no examples cannot take training steps")
        drawn = 0
        while drawn < steps:
            for batch in self.epoch(indices, batch_size, rng):
                yield batch
                drawn += 1
                if drawn == steps:
                    return
