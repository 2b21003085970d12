"""Sequence classification: a text in, one of C labels out (``task=topic``, ``task=classification``).

Everything specific to classification lives here: the data (a text and a label per example),
the model (``AutoModelForSequenceClassification``: a new head on top of the pretrained encoder),
its loss (cross-entropy of the logits) and its evaluation (accuracy and mean cross-entropy on
the test split).

* ``topic`` (the default): the embedded data: topic classification of the English
  conversations shipped in the ``chatterbot-corpus`` wheel. Every utterance is labelled with
  the topic file it comes from (21 topics). Utterances that occur in more than one topic are
  ambiguous and dropped; an exact duplicate inside one topic is kept once. The split is fixed
  (``fedlora.tasks.data.in_test_split`` at 20 %).
* ``classification``: the user's data, ``data.path`` (JSONL/CSV, ``data.text_field`` and
  ``data.label_field``) or ``data.name`` (a Hugging Face dataset id). Labels are read from the
  data (any number of classes).

The model: the keys ``from_pretrained`` reports as missing (newly initialised) form the task
head: it is trained and shared with the adapters (for BERT: ``classifier.weight`` and
``classifier.bias``). The default model is the embedded all-MiniLM-L6-v2 (``model=minilm``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedlora.tasks.data import (DataSpec, ExampleBatches, encode_labels, split_by_hash, split_files)
from fedlora.core.errors import ConfigError
from fedlora.tasks import Task, register_task


@dataclass(frozen=True)
class TextSplit:
    """One split: parallel tuples of texts and integer labels."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def majority_share(self) -> float:
        """The most frequent label's share: the accuracy of always predicting it, the floor a
        DP result's kept share of the no-DP gain is measured from."""
        return Counter(self.labels).most_common(1)[0][1] / len(self.labels)


@dataclass(frozen=True)
class TextDataset:
    train: TextSplit
    test: TextSplit
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _make_dataset(train: tuple[list, list], test: tuple[list, list]) -> TextDataset:
    y_train, y_test, names = encode_labels(train[1], test[1])
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
    return _make_dataset(*split_by_hash(texts, labels, 0.2))


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


def load_from_path(spec: DataSpec) -> TextDataset:
    (train_rows, train_where), test = split_files(spec)
    train = _columns(train_rows, spec, train_where)
    if test is None:
        return _make_dataset(*split_by_hash(*train, spec.test_fraction))
    return _make_dataset(train, _columns(*test[:1], spec, test[1]))


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
    return _make_dataset(*split_by_hash(*train, spec.test_fraction))


@lru_cache(maxsize=4)
def load_dataset(spec: DataSpec) -> TextDataset:
    """Load (once per process) the dataset named by ``spec``."""
    if spec.path:
        return load_from_path(spec)
    if spec.name:
        return load_from_hub(spec)
    return load_chatterbot()



class Batches(ExampleBatches):
    """Tokenised texts of one split with their class labels, batched with dynamic padding."""

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


@torch.no_grad()
def evaluate(bundle, batches, batch_size: int = 128, device: str = "cpu") -> dict:
    """Accuracy and mean cross-entropy of the model on every example of ``batches``."""
    model = bundle.model
    was_training = model.training
    model.eval()
    # Length-sorted batches waste little on padding; the result does not depend on the order.
    order = sorted(range(len(batches)), key=lambda i: len(batches.input_ids[i]))
    correct, loss_sum = 0, 0.0
    for batch in batches.epoch(order, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train(was_training)
    return {"accuracy": correct / len(batches), "loss": loss_sum / len(batches)}


@dataclass(frozen=True)
class Classification(Task):
    """A sequence classifier: text -> label, scored by accuracy (the user's data)."""

    default_model = "minilm"
    default_max_length = 32
    metrics = ("accuracy", "loss")

    def load(self) -> TextDataset:
        data = load_dataset(self.data)
        if data.num_labels < 2:
            raise ConfigError(f"the data has {data.num_labels} label value(s); a classification "
                              "task needs at least 2 (check data.label_field)")
        return data

    def check(self) -> None:
        if not (self.data.path or self.data.name):
            raise ConfigError(f"task={self.name} reads your data: set data.path (or data.name), "
                              "or use task=topic for the embedded data")

    @classmethod
    def load_pretrained(cls, path: str, spec, options: dict) -> tuple:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(spec.init_seed)  # the new head's init
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, output_loading_info=True,
            **options)
        if tokenizer.pad_token is None:  # decoder models (GPT-2, Llama) ship without one
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer, frozenset(info["missing_keys"])

    def training_examples(self, tokenizer, max_length: int) -> Batches:
        train = self.dataset().train
        return Batches(tokenizer, train.texts, train.labels, max_length)

    @staticmethod
    def loss(model, batch: dict, reduction: str = "mean"):
        """Cross-entropy of the logits against the labels (the model's own ``.loss`` for the
        mean: the same operation transformers' classifiers compute)."""
        if reduction == "mean":
            return model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)

    def evaluator(self, bundle, test, max_length: int, device: str):
        batches = Batches(bundle.tokenizer, test.texts, test.labels, max_length)
        return lambda: evaluate(bundle, batches, device=device)


@dataclass(frozen=True)
class TopicClassification(Classification):
    """The embedded default: chatterbot utterance -> topic (21 topics). A SuperNode with its
    own copy of the data (``--node-config data.path=...``) reads that instead, as any
    classification task does."""

    def check(self) -> None:
        if self.data.path or self.data.name:
            raise ConfigError(f"task={self.name} is the embedded topic data; drop data.path/"
                              "data.name, or use task=classification for your data")


register_task("topic", TopicClassification)
register_task("classification", Classification)
