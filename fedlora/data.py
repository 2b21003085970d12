"""Datasets, the fixed train/test split, client partitions and batching.

Three sources, one shape (a list of texts and integer labels per split):

* the embedded default: topic classification of the English conversations shipped in the
  ``chatterbot-corpus`` wheel. Every utterance is labelled with the topic file it comes from
  (21 topics). Utterances that occur in more than one topic are ambiguous and dropped; an exact
  duplicate inside one topic is kept once. The split is fixed and independent of any seed: an
  utterance is in the test split iff the first 8 bytes of ``sha1(text)``, as a big-endian
  integer, mod 10 000 are below 2 000 (about 20 %; ``in_test_split``).
* ``data.path``: a directory with ``train`` and ``test`` files (``.jsonl`` or ``.csv``), or one
  such file that is split by ``data.test_fraction`` with the same hash rule.
* ``data.name``: a Hugging Face dataset id loaded with ``datasets`` (needs network access).

Labels are read from the data (any number of classes). Partitions over clients come from
flwr-datasets partitioners (IID, Dirichlet over labels, and pathological: k labels per client).
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

from fedlora.errors import ConfigError
from fedlora.settings import OPEN_UNIT_INTERVAL, setting


@dataclass(frozen=True)
class TextSplit:
    """One split: parallel tuples of texts and integer labels."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextDataset:
    train: TextSplit
    test: TextSplit
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from (the ``data.*`` config section); hashable so each process
    loads it once."""

    path: str | None = setting(None, "a folder with train/test .jsonl|.csv files, or one such "
                               "file split by test_fraction")
    name: str | None = setting(None, "a Hugging Face dataset id (needs network)")
    text_field: str = setting("text", "the column holding the text")
    label_field: str = setting("label", "the column holding the label")
    test_fraction: float = setting(0.2, "share of a single file held out for testing",
                                   check=OPEN_UNIT_INTERVAL)


def in_test_split(text: str, test_fraction: float) -> bool:
    """The fixed split rule: a stable hash of the text, independent of order and seed."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 10_000
    return bucket < round(test_fraction * 10_000)


def _split_by_hash(texts: list[str], labels: list, test_fraction: float):
    train, test = ([], []), ([], [])
    for text, label in zip(texts, labels):
        side = test if in_test_split(text, test_fraction) else train
        side[0].append(text)
        side[1].append(label)
    return train, test


def _encode_labels(train_labels: list, test_labels: list) -> tuple[list[int], list[int], tuple[str, ...]]:
    """Map raw labels (strings or ints) to 0..C-1 in sorted order of the raw values."""
    raw = sorted(set(train_labels) | set(test_labels), key=lambda v: (isinstance(v, str), v))
    index = {value: i for i, value in enumerate(raw)}
    return [index[v] for v in train_labels], [index[v] for v in test_labels], tuple(str(v) for v in raw)


def _make_dataset(train: tuple[list, list], test: tuple[list, list]) -> TextDataset:
    y_train, y_test, names = _encode_labels(train[1], test[1])
    return TextDataset(TextSplit(tuple(train[0]), tuple(y_train)),
                       TextSplit(tuple(test[0]), tuple(y_test)), names)


def load_chatterbot() -> TextDataset:
    """The embedded default task: utterance -> topic file, 21 English topics."""
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    topics_of: dict[str, set[str]] = {}
    order: list[str] = []
    for topic_file in sorted(folder.glob("*.yml")):
        topic = topic_file.stem
        for conversation in yaml.safe_load(topic_file.read_text(encoding="utf-8"))["conversations"]:
            for utterance in conversation:
                text = " ".join(str(utterance).split())
                if not text:
                    continue
                if text not in topics_of:
                    topics_of[text] = set()
                    order.append(text)
                topics_of[text].add(topic)
    texts = [t for t in order if len(topics_of[t]) == 1]
    labels = [next(iter(topics_of[t])) for t in texts]
    return _make_dataset(*_split_by_hash(texts, labels, 0.2))


def _read_rows(file: Path) -> list[tuple[int, dict]]:
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


def _columns(rows: list[tuple[int, dict]], spec: DataSpec, where: str) -> tuple[list[str], list]:
    """Texts and raw labels; every row must hold both fields (a CSV row cut short has None)."""
    if not rows:
        raise ConfigError(f"data.path '{where}' has no rows; give a non-empty .jsonl or .csv file")
    for number, row in rows:
        for key, field in (("data.text_field", spec.text_field), ("data.label_field", spec.label_field)):
            if row.get(field) is None:
                if field not in rows[0][1]:  # no row has it: the key names the wrong column
                    raise ConfigError(f"{key}='{field}' is not a column of '{where}' (columns: "
                                      f"{', '.join(map(str, rows[0][1]))}); set {key} to one of them")
                raise ConfigError(f"'{where}' line {number} has no '{field}' ({key}); add it to "
                                  "that row or remove the row")
    return ([str(row[spec.text_field]) for _, row in rows],
            [row[spec.label_field] for _, row in rows])


def _find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".csv"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def load_from_path(spec: DataSpec) -> TextDataset:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path='{spec.path}' does not exist; give a directory with "
                          "train/test .jsonl or .csv files, or one such file")
    if path.is_dir():
        train_file, test_file = _find_split_file(path, "train"), _find_split_file(path, "test")
        if train_file is None:
            raise ConfigError(f"data.path='{spec.path}' has no train.jsonl or train.csv; add one "
                              "(and test.jsonl/test.csv, or it is split by data.test_fraction)")
        train = _columns(_read_rows(train_file), spec, str(train_file))
        if test_file is None:
            return _make_dataset(*_split_by_hash(*train, spec.test_fraction))
        return _make_dataset(train, _columns(_read_rows(test_file), spec, str(test_file)))
    return _make_dataset(*_split_by_hash(*_columns(_read_rows(path), spec, str(path)),
                                         spec.test_fraction))


def load_from_hub(spec: DataSpec) -> TextDataset:
    import datasets

    try:
        hub = datasets.load_dataset(spec.name)
    except Exception as error:  # network, unknown id, auth: all one-line config errors
        raise ConfigError(f"data.name='{spec.name}' could not be loaded ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); check the id and "
                          "network access, or use data.path with local files") from error
    if "train" not in hub:
        raise ConfigError(f"data.name='{spec.name}' has no 'train' split (splits: {', '.join(hub)})")

    def columns(split: str):
        ds = hub[split]
        for key, field in (("data.text_field", spec.text_field), ("data.label_field", spec.label_field)):
            if field not in ds.column_names:
                raise ConfigError(f"{key}='{field}' is not a column of {spec.name} "
                                  f"(columns: {', '.join(ds.column_names)}); set {key}")
        return [str(t) for t in ds[spec.text_field]], list(ds[spec.label_field])

    train = columns("train")
    if "test" in hub:
        return _make_dataset(train, columns("test"))
    return _make_dataset(*_split_by_hash(*train, spec.test_fraction))


@lru_cache(maxsize=4)
def load_dataset(spec: DataSpec) -> TextDataset:
    """Load (once per process) the dataset named by ``spec``."""
    if spec.path:
        return load_from_path(spec)
    if spec.name:
        return load_from_hub(spec)
    return load_chatterbot()


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
def client_partitions(spec: DataSpec, num_partitions: int, partition, seed: int
                      ) -> tuple[tuple[int, ...], ...]:
    """Each client's training indices under ``partition`` (``fedlora.config.PartitionConfig``).
    Cached per process: every virtual client on a Ray worker reuses one computation."""
    labels = load_dataset(spec).train.labels
    return tuple(tuple(p) for p in partition_indices(labels, num_partitions, partition.name,
                                                      partition.alpha, seed,
                                                      partition.labels_per_client))


# --------------------------------------------------------------------------------------------
# Tokenisation and batches (dynamic padding: a batch is padded to its own longest text)


class Batches:
    """Tokenised examples of one split, batched with dynamic padding."""

    def __init__(self, tokenizer, texts, labels, max_length: int):
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.input_ids = [torch.tensor(ids) for ids in encoded["input_ids"]]
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices) -> dict[str, torch.Tensor]:
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, :len(row)] = row
            attention_mask[j, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": self.labels[list(indices)]}

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
