"""Tasks: what a federated run trains the model to do. A task is one file in ``fedlora/tasks/``.

A task file defines a ``Task`` subclass and ends with one line per name it serves::

    register_task("topic", TopicClassification)

The run chooses it with ``task=<name>`` (null: ``topic``, or ``classification`` when
``data.path``/``data.name`` is set). Generic code (strategies, the server loop, comm accounting,
checkpoints, DP, deployment, the ClientApp) never names a task: it calls these hooks.

Hooks (see ``Task``):
  ``dataset()``            the train/test splits (cached per process); ``train.labels`` are the
                           integer labels partitioners split on and label histograms count
  ``load_pretrained``      (class method) the Hugging Face model, tokenizer and head keys; the
                           generic loader (``fedlora.model.pretrained.build_model``) adds the adapters
  ``training_examples``    the tokenised training split: ``collate``, ``epoch``, ``sample_steps``
  ``loss``                 (static) the loss of a batch with reduction mean | sum | none (one
                           value per example: what DP-SGD clips and Fed-SB's set-up sums)
  ``evaluator``            a function that scores the server's model on the test split
  ``example_report``       counts for ``summary.json`` (e.g. truncated examples)
  ``check``                rules relating the task to other keys (one-line ``ConfigError``)
  ``check_model``          a cheap look at the model folder before any worker starts

Class attributes: ``default_model``, ``default_max_length``, ``run_defaults`` (``model``,
``max_length``, ``rounds``, ``local_steps``, ``batch_size``, ``eval_every``,
``clients_per_round`` left null take them), and ``metrics``: the row keys of the evaluation, (primary metric, held-out
loss), e.g. ``("accuracy", "loss")`` or ``("exact_match", "eval_loss")``.

Layer 2: the tasks and their data (``fedlora.tasks.data``); may import ``fedlora.core``,
``fedlora.aggregation`` and ``fedlora.privacy``. The model layer asks a task which model class
to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, ClassVar

from fedlora.tasks.data import DataSpec
from fedlora.core.registry import Plugins
from fedlora.core.settings import POSITIVE, setting

ANSWER_RULES = ("last_number", "text", "regex")


@dataclass(frozen=True)
class EvalSpec:
    """How a generative task is scored on the server (the ``eval.*`` section)."""

    max_new_tokens: int = setting(32, "generative tasks: greedy tokens generated per test prompt "
                                  "(an arithmetic solution takes up to 26 with its EOS)",
                                  check=POSITIVE)
    answer: str | None = setting(None, "generative tasks: the answer exact match compares: "
                                 "last_number | text (whitespace-normalised) | regex "
                                 "(eval.pattern); null: the task's (arithmetic: last_number, "
                                 "sft: text)", choices=ANSWER_RULES)
    pattern: str | None = setting(None, "answer=regex: a regular expression whose first group "
                                  "is the answer")
    max_examples: int | None = setting(None, "generative tasks: score only the first N test "
                                       "examples, a fixed subset (greedy generation takes 2-5 s "
                                       "per prompt on a CPU); null: the task's (arithmetic: 50; "
                                       "others: all)", check=POSITIVE)
    batch_size: int = setting(16, "generative tasks: prompts per generation batch",
                              check=POSITIVE)


@dataclass(frozen=True)
class Task:
    """One task: its data source and evaluation settings (hashable: a per-process cache key).

    Subclasses implement the hooks below; each names what generic code relies on."""

    data: DataSpec = field(default_factory=DataSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    name: ClassVar[str] = ""  # set by register_task
    default_model: ClassVar[str] = ""
    default_max_length: ClassVar[int] = 32
    # Run sizes that null keys take: a run of the task's embedded default fits a few minutes
    # on 2 CPU cores (clients_per_round: at most this many, and at most clients).
    run_defaults: ClassVar[dict] = {"rounds": 25, "local_steps": 8, "batch_size": 16,
                                    "eval_every": 1, "clients_per_round": 10}
    metrics: ClassVar[tuple[str, str]] = ("accuracy", "loss")  # (primary, held-out loss)
    # The keys of ``example_report`` counted over the clients' training data: a DP run leaves
    # them out of summary.json (un-noised statistics of the data DP protects).
    training_data_counts: ClassVar[tuple[str, ...]] = ()

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def dataset(self):
        """The train and test splits, loaded once per process: an object with ``train``,
        ``test`` (each with ``labels``: integer partition labels) and ``label_names``."""
        return _cached_dataset(self)

    def load(self):
        """Read the data (``dataset`` caches it); one-line ``ConfigError`` on bad input."""
        raise NotImplementedError

    @classmethod
    def load_pretrained(cls, path: str, spec, options: dict) -> tuple:
        """``(model, tokenizer, head_keys)`` of the pretrained model at ``path`` for this task
        (``spec``: ``fedlora.model.pretrained.ModelSpec``; ``options``: the keyword arguments of
        ``from_pretrained`` the model layer chose: dtype, quantisation). ``head_keys``: the
        state-dict keys of the newly initialised head that is trained and travels with the
        adapters (empty: none)."""
        raise NotImplementedError

    def training_examples(self, tokenizer, max_length: int):
        """The tokenised training split (``fedlora.tasks.data.ExampleBatches``)."""
        raise NotImplementedError

    @staticmethod
    def loss(model, batch: dict, reduction: str = "mean"):
        """The loss of ``batch`` under ``model``: "mean" (the training objective), "sum", or
        "none" (one value per example)."""
        raise NotImplementedError

    def evaluator(self, bundle, test, max_length: int, device: str) -> Callable[[], dict]:
        """A function that scores ``bundle``'s current model on ``test`` (a split of
        ``dataset()``), returning ``{metrics[0]: ..., metrics[1]: ...}``."""
        raise NotImplementedError

    def example_report(self, tokenizer, data, max_length: int) -> dict:
        """Counts about the examples for ``summary.json`` (none by default)."""
        return {}

    def check(self) -> None:
        """Rules relating the task to its data settings (one-line ``ConfigError``)."""

    def check_model(self, path: str) -> None:
        """A cheap look at a model before anything is loaded (e.g. its ``config.json``): a
        one-line ``ConfigError`` if it cannot serve this task. ``path``: ``model_path``'s."""


def reduce_loss(per_example, reduction: str):
    """``per_example`` losses reduced by ``reduction`` (mean | sum | none)."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction '{reduction}' is not one of mean, sum, none")


@lru_cache(maxsize=4)
def _cached_dataset(task: Task):
    return task.load()


_TASKS = Plugins("task", __name__)


def register_task(name: str, task_class: type) -> type:
    """Register ``task_class`` under ``name`` (lower-case letters and digits, not taken yet).
    One class may serve several names (``topic`` and ``classification``): it is subclassed
    so that each name has its own class."""
    named = type(task_class.__name__, (task_class,), {"name": name,
                                                      "__module__": task_class.__module__})
    _TASKS.add(name, dataclass(frozen=True)(named))
    return _TASKS.registered[name]


def tasks() -> dict[str, type]:
    """Every registered task by name (the modules of this package register themselves)."""
    return _TASKS.all()


def get_task(name: str) -> type:
    """The task class registered as ``name``; a one-line ``ConfigError`` naming the choices."""
    return _TASKS.get(name)


def make_task(name: str, data: DataSpec | None = None, evaluation: EvalSpec | None = None) -> Task:
    return get_task(name)(data or DataSpec(), evaluation or EvalSpec())


def default_task(data: DataSpec) -> str:
    """``task: null``: the user's classification data if given, else the embedded topics."""
    return "classification" if data.path or data.name else "topic"
