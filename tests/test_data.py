"""Datasets, the fixed split, client partitions and batching (fedlora.tasks.data)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from fedlora.tasks.data import DataSpec, in_test_split, partition_indices
from fedlora.tasks.classification import Batches, load_dataset
from fedlora.core.errors import ConfigError

# --------------------------------------------------------------------------------------------
# The embedded default (chatterbot-corpus topics)


@pytest.fixture(scope="module")
def embedded():
    return load_dataset(DataSpec())


def test_embedded_dataset_has_21_labels_and_a_disjoint_split(embedded):
    # Execute
    train, test = set(embedded.train.texts), set(embedded.test.texts)
    fraction = len(embedded.test) / (len(embedded.train) + len(embedded.test))

    # Assert
    assert embedded.num_labels == 21
    assert len(embedded.label_names) == 21
    assert embedded.label_names == tuple(sorted(embedded.label_names))
    assert {"greetings", "ai", "humor"} <= set(embedded.label_names)
    assert train.isdisjoint(test)
    assert len(train) == len(embedded.train.texts)  # a duplicate inside one topic is kept once
    assert len(test) == len(embedded.test.texts)
    assert 0.15 <= fraction <= 0.25
    assert set(embedded.train.labels) == set(range(21))
    assert len(embedded.train.labels) == len(embedded.train.texts)
    assert len(embedded.test.labels) == len(embedded.test.texts)


def test_embedded_split_is_fixed(embedded):
    # Execute
    load_dataset.cache_clear()
    again = load_dataset(DataSpec())

    # Assert
    assert again is not embedded
    assert again == embedded
    assert all(in_test_split(text, 0.2) for text in again.test.texts)
    assert not any(in_test_split(text, 0.2) for text in again.train.texts)


# --------------------------------------------------------------------------------------------
# data.path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_path_directory_with_train_and_test_jsonl(tmp_path):
    # Prepare
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good film", "label": "pos"},
                                           {"text": "bad film", "label": "neg"},
                                           {"text": "great plot", "label": "pos"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "awful acting", "label": "neg"},
                                          {"text": "so so", "label": "meh"}])

    # Execute
    dataset = load_dataset(DataSpec(path=str(tmp_path)))

    # Assert
    assert dataset.label_names == ("meh", "neg", "pos")
    assert dataset.train.texts == ("good film", "bad film", "great plot")
    assert dataset.train.labels == (2, 1, 2)
    assert dataset.test.texts == ("awful acting", "so so")
    assert dataset.test.labels == (1, 0)
    assert dataset.num_labels == 3


def test_path_single_csv_is_split_by_test_fraction(tmp_path):
    # Prepare
    rows = [{"text": f"utterance number {i}", "label": ("a", "b", "c")[i % 3]} for i in range(400)]
    file = tmp_path / "all.csv"
    write_csv(file, rows)

    # Execute
    dataset = load_dataset(DataSpec(path=str(file), test_fraction=0.3))

    # Assert
    expected_test = [r["text"] for r in rows if in_test_split(r["text"], 0.3)]
    assert list(dataset.test.texts) == expected_test
    assert list(dataset.train.texts) == [r["text"] for r in rows if not in_test_split(r["text"], 0.3)]
    assert len(dataset.train) + len(dataset.test) == 400
    assert 0.2 <= len(dataset.test) / 400 <= 0.4
    assert dataset.label_names == ("a", "b", "c")
    for text, label in zip(dataset.test.texts, dataset.test.labels):
        assert label == int(text.split()[-1]) % 3


def test_path_custom_field_names(tmp_path):
    # Prepare
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": "x y", "topic": 4}, {"sentence": "z", "topic": 2}])
    write_jsonl(tmp_path / "test.jsonl", [{"sentence": "w", "topic": 9}])

    # Execute
    dataset = load_dataset(DataSpec(path=str(tmp_path), text_field="sentence", label_field="topic"))

    # Assert
    assert dataset.label_names == ("2", "4", "9")
    assert dataset.train.texts == ("x y", "z")
    assert dataset.train.labels == (1, 0)
    assert dataset.test.labels == (2,)


def test_path_missing_label_column_names_the_key(tmp_path):
    # Prepare
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "category": "x"}])

    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        load_dataset(DataSpec(path=str(tmp_path)))
    message = str(error.value)
    assert "data.label_field='label'" in message
    assert "columns: text, category" in message
    assert "\n" not in message


def test_path_missing_text_column_names_the_key(tmp_path):
    # Prepare
    file = tmp_path / "rows.csv"
    write_csv(file, [{"body": "a", "label": "x"}])

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"data\.text_field='text' is not a column"):
        load_dataset(DataSpec(path=str(file)))


def test_path_that_does_not_exist_names_data_path(tmp_path):
    # Prepare
    missing = tmp_path / "nowhere"

    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        load_dataset(DataSpec(path=str(missing)))
    assert f"data.path='{missing}' does not exist" in str(error.value)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# Partitions


def distinct_labels(labels, partition):
    return len({labels[i] for i in partition})


def test_iid_partitions_are_disjoint_cover_everything_and_balanced(embedded):
    # Prepare
    labels = embedded.train.labels

    # Execute
    partitions = partition_indices(labels, 10, "iid", 0.5, seed=0)

    # Assert
    assert len(partitions) == 10
    flat = [i for p in partitions for i in p]
    assert len(flat) == len(set(flat)) == len(labels)
    assert set(flat) == set(range(len(labels)))
    sizes = [len(p) for p in partitions]
    assert max(sizes) - min(sizes) <= 1
    assert all(p == sorted(p) for p in partitions)


def test_dirichlet_partitions_are_disjoint_non_empty_and_skewed(embedded):
    # Prepare
    labels = embedded.train.labels
    iid = partition_indices(labels, 10, "iid", 0.5, seed=0)

    # Execute
    partitions = partition_indices(labels, 10, "dirichlet", 0.1, seed=0)

    # Assert
    assert len(partitions) == 10
    flat = [i for p in partitions for i in p]
    assert len(flat) == len(set(flat)) == len(labels)
    assert set(flat) == set(range(len(labels)))
    assert all(len(p) >= 1 for p in partitions)
    mean_labels = sum(distinct_labels(labels, p) for p in partitions) / 10
    mean_labels_iid = sum(distinct_labels(labels, p) for p in iid) / 10
    assert mean_labels_iid >= 18  # IID shards of ~150 examples see most of the 21 topics
    assert mean_labels < mean_labels_iid - 3


@pytest.mark.parametrize("scheme,alpha", [("iid", 0.5), ("dirichlet", 0.3)])
def test_partitions_are_reproducible_from_the_seed(embedded, scheme, alpha):
    # Execute
    first = partition_indices(embedded.train.labels, 7, scheme, alpha, seed=3)
    second = partition_indices(embedded.train.labels, 7, scheme, alpha, seed=3)
    other = partition_indices(embedded.train.labels, 7, scheme, alpha, seed=4)

    # Assert
    assert first == second
    assert first != other


def test_unknown_partition_scheme_lists_the_valid_ones():
    # Execute / Assert
    with pytest.raises(ConfigError, match="partition 'shards' is unknown; choose one of: iid, "
                                          "dirichlet, pathological"):
        partition_indices((0, 1, 0, 1), 2, "shards", 0.5, seed=0)


@pytest.mark.parametrize("labels_per_client", [1, 2, 3])
def test_pathological_partitions_hold_exactly_k_labels(embedded, labels_per_client):
    # Prepare
    labels = embedded.train.labels

    # Execute
    partitions = partition_indices(labels, 20, "pathological", 0.5, seed=0,
                                   labels_per_client=labels_per_client)
    again = partition_indices(labels, 20, "pathological", 0.5, seed=0,
                              labels_per_client=labels_per_client)

    # Assert
    assert partitions == again
    flat = [i for p in partitions for i in p]
    assert len(flat) == len(set(flat))
    assert all(distinct_labels(labels, p) == labels_per_client for p in partitions)
    # first-deterministic: client i holds label i mod C
    assert all(i % 21 in {labels[j] for j in p} for i, p in enumerate(partitions))


def test_pathological_partitions_that_cannot_be_built_are_config_errors(embedded):
    # Execute / Assert: too many labels, and labels spread over more clients than examples
    with pytest.raises(ConfigError, match="partition.labels_per_client=22 must be in 1..21"):
        partition_indices(embedded.train.labels, 10, "pathological", 0.5, seed=0, labels_per_client=22)
    with pytest.raises(ConfigError, match="partition=pathological with clients=100 cannot be built"):
        partition_indices(embedded.train.labels, 100, "pathological", 0.5, seed=0, labels_per_client=3)


def test_more_clients_than_examples_is_a_config_error():
    # Execute / Assert
    with pytest.raises(ConfigError, match="clients=5 exceeds the 4 training examples"):
        partition_indices((0, 1, 0, 1), 5, "iid", 0.5, seed=0)


# --------------------------------------------------------------------------------------------
# Batches


class WordTokenizer:
    """One token id per word (id = word length + 10), pad id 0; enough for collation."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        ids = [[len(word) + 10 for word in text.split()] for text in texts]
        return {"input_ids": [row[:max_length] if truncation else row for row in ids]}


@pytest.fixture
def word_batches():
    texts = ["a bb ccc", "dddd", "e f g h i j k", "ll mm"]
    return Batches(WordTokenizer(), texts, [3, 1, 0, 2], max_length=5)


def test_collate_pads_to_the_longest_row(word_batches):
    # Execute
    batch = word_batches.collate([0, 1, 3])

    # Assert
    assert batch["input_ids"].tolist() == [[11, 12, 13], [14, 0, 0], [12, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2]
    assert batch["labels"].tolist() == [3, 1, 2]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long


def test_collate_truncates_to_max_length(word_batches):
    # Execute
    batch = word_batches.collate([2])

    # Assert
    assert batch["input_ids"].shape == (1, 5)
    assert batch["attention_mask"].sum().item() == 5


def test_epoch_without_rng_keeps_order_and_batch_sizes(word_batches):
    # Execute
    batches = list(word_batches.epoch([3, 2, 1, 0], 3))

    # Assert
    assert [b["labels"].tolist() for b in batches] == [[2, 0, 1], [3]]


@pytest.mark.parametrize("steps", [1, 2, 5, 7])
def test_sample_steps_yields_exactly_steps_batches(word_batches, steps):
    # Execute
    batches = list(word_batches.sample_steps(range(4), 3, steps, random.Random(0)))

    # Assert
    assert len(batches) == steps
    assert [len(b["labels"]) for b in batches] == [(3, 1)[i % 2] for i in range(steps)]
    # Every full pass over the indices sees each example exactly once.
    for first, second in zip(batches[0::2], batches[1::2]):
        assert sorted(first["labels"].tolist() + second["labels"].tolist()) == [0, 1, 2, 3]


def test_batches_with_the_real_tokenizer_mask_equals_token_lengths():
    # Prepare
    from transformers import AutoTokenizer

    from fedlora.model.pretrained import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"))
    texts = ["hi", "what is your favourite book", "tell me about the history of rome please"]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=8)["input_ids"]]
    batches = Batches(tokenizer, texts, [0, 1, 2], max_length=8)

    # Execute
    batch = batches.collate([0, 1, 2])

    # Assert
    assert lengths[0] == 3 and lengths[2] == 8  # [CLS] hi [SEP]; truncated at 8
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
