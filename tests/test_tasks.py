"""The task registry and the config keys that pick a task (``task``, ``model``/``max_length``
null, ``eval.*``), and the sft data reader (columns or chat ``messages``)."""

import json

import pytest

from fedlora.config import RunConfig, client_config, task_from_client_config
from fedlora.tasks.data import DataSpec
from fedlora.core.errors import ConfigError
from fedlora.tasks import tasks
from fedlora.tasks.generation import last_number, normalised_text


def test_every_task_file_registers_its_names():
    assert sorted(tasks()) == ["arithmetic", "classification", "sft", "topic"]
    assert {name: cls.metrics[0] for name, cls in tasks().items()} == {
        "arithmetic": "exact_match", "classification": "accuracy", "sft": "exact_match",
        "topic": "accuracy"}


@pytest.mark.parametrize("raw, expected", [
    ({}, ("topic", "minilm", 32)),
    ({"data": {"path": "/tmp/x"}}, ("classification", "minilm", 32)),
    ({"task": "arithmetic"}, ("arithmetic", "smollm2", 192)),
    ({"task": "sft", "data": {"path": "/tmp/x"}, "model": "/m", "max_length": 64},
     ("sft", "/m", 64)),
])
def test_null_task_model_and_max_length_take_the_tasks_defaults(raw, expected):
    cfg = RunConfig.from_dict(raw)
    assert (cfg.task, cfg.model, cfg.max_length) == expected


@pytest.mark.parametrize("raw, message", [
    ({"task": "summarise"}, "task 'summarise' is unknown; choose one of: arithmetic, "
                            "classification, sft, topic"),
    ({"task": "classification"}, "task=classification reads your data: set data.path"),
    ({"task": "sft"}, "task=sft reads your prompt/response data: set data.path"),
    ({"task": "topic", "data": {"path": "/x"}}, "task=topic is the embedded topic data; drop "
                                                "data.path/data.name"),
    ({"task": "arithmetic", "data": {"path": "/x"}}, "task=arithmetic is the embedded arithmetic"),
    ({"task": "arithmetic", "eval": {"answer": "regex"}}, "eval.answer=regex needs eval.pattern"),
    ({"task": "arithmetic", "eval": {"answer": "regex", "pattern": "answer: \\d+"}},
     "eval.pattern: the answer pattern 'answer: \\\\d+' has no capture group"),
    ({"task": "arithmetic", "eval": {"answer": "first"}}, "eval.answer 'first' is unknown"),
])
def test_task_settings_that_do_not_fit_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_task_travels_to_clients_in_the_message_config(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict({"task": "sft", "data": {"path": str(tmp_path)},
                               "eval": {"max_examples": 5, "answer": "last_number"}})
    # Execute
    record = client_config(cfg, 1)
    task = task_from_client_config(record, cfg.data)
    # Assert
    assert record["task"] == "sft" and task == cfg.task_spec()
    assert task.evaluation.max_examples == 5 and task.rule is last_number


def test_sft_reads_columns_and_chat_messages_with_a_partition_label(tmp_path):
    # Prepare
    rows = [{"q": "Say hi", "a": "hi", "topic": "greet"},
            {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Say bye"},
                          {"role": "assistant", "content": "bye"}], "topic": "leave"}]
    tests = [{"q": "Say yo", "a": "yo", "topic": "greet"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests))
    cfg = RunConfig.from_dict({"task": "sft", "data": {"path": str(tmp_path), "prompt_field": "q",
                                                       "response_field": "a",
                                                       "label_field": "topic"}})
    # Execute
    data = cfg.task_spec().dataset()
    # Assert
    assert data.train.prompts[0] == "Say hi" and data.train.responses == ("hi", "bye")
    assert data.train.prompts[1] == ({"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Say bye"})
    assert data.label_names == ("greet", "leave") and data.train.labels == (0, 1)
    assert data.test.responses == ("yo",) and cfg.task_spec().rule is normalised_text


def test_a_chat_that_does_not_end_with_the_assistant_is_a_one_line_error(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    cfg = RunConfig.from_dict({"task": "sft", "data": {"path": str(tmp_path / "d.jsonl")}})
    with pytest.raises(ConfigError, match=r"d.jsonl' line 1: its messages a chat example must "
                                          r"end with an assistant message"):
        cfg.task_spec().dataset()


def test_arithmetic_scores_a_fixed_subset_of_50_unless_eval_max_examples_says_otherwise():
    # Prepare
    default = RunConfig.from_dict({"task": "arithmetic"}).task_spec()
    given = RunConfig.from_dict({"task": "arithmetic", "eval": {"max_examples": 7}}).task_spec()
    test = default.dataset().test

    # Execute / Assert: the first problems of the fixed test split, in order
    assert [p for p, _ in default.scored(test)] == list(test.prompts[:50])
    assert len(given.scored(test)) == 7


def test_majority_share_is_the_most_frequent_labels_share():
    # the floor a DP result's kept share of the no-DP gain is measured from
    from fedlora.tasks.classification import TextSplit
    split = TextSplit(("a", "b", "c", "d", "e"), (2, 0, 2, 1, 2))
    assert split.majority_share() == pytest.approx(3 / 5)
