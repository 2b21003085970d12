"""Generative fine-tuning of causal language models: data, SFT encoding, loss, decoding, scoring.

Supervised fine-tuning (SFT) on (prompt, response) pairs, as in instruction tuning (Ouyang et
al., 2022, arXiv 2203.02155; FedIT, Zhang et al., 2023, arXiv 2305.05644, trains LoRA this way
federatedly): the model reads the prompt and is trained to produce the response and then stop.

* ``encode_example`` renders the prompt (with the tokenizer's chat template when it has one and
  ``use_chat_template`` is set), appends the response and EOS, and masks the prompt's labels with
  -100, so only response tokens carry loss. Too long: the prompt is cut from the left; a response
  that does not fit is an error, never silently dropped.
* ``sft_loss`` is the mean over examples of each example's mean response-token loss: the example
  is the unit that DP-SGD clips, and every example weighs the same whatever its length.
* ``generate_answers`` decodes greedily in left-padded batches; ``exact_match`` compares the
  answers a rule extracts from predictions and references (``last_number``, ``normalised_text``,
  ``regex_answer``); ``evaluate_generation`` reports exact match and the mean response loss.
* ``arithmetic_problems`` is the embedded offline data: GSM8K-style (Cobbe et al., 2021,
  arXiv 2110.14168) one- and two-operation word problems, generated deterministically in code,
  with their problem type as the label that non-IID partitioners split on.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from fedlora.tasks.data import DataSpec, ExampleBatches, encode_labels, in_test_split, split_files
from fedlora.core.errors import ConfigError
from fedlora.tasks import Task, reduce_loss, register_task

IGNORE_INDEX = -100  # the label of a token without loss (torch cross_entropy's ignore_index)

# ---------------------------------------------------------------------------------------------
# Embedded data: arithmetic word problems
# ---------------------------------------------------------------------------------------------

_NAMES = (("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Daniel", "he"), ("Emma", "she"),
          ("Felix", "he"), ("Grace", "she"), ("Hugo", "he"), ("Isla", "she"), ("Jack", "he"),
          ("Kira", "she"), ("Leo", "he"), ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"),
          ("Pablo", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Tom", "he"),
          ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Yusuf", "he"))
_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells",
           "cards", "balloons", "crayons", "candies", "coins", "buttons", "oranges", "toy cars",
           "beads", "muffins", "flowers", "eggs")

# op: how an operand combines with the running value (evaluate_operations)
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "/": lambda x, y: x // y}


@dataclass(frozen=True)
class Problem:
    """One word problem. ``operations`` is the chain the answer comes from: a start value, then
    ``(op, operand)`` steps applied left to right (``evaluate_operations``)."""

    prompt: str
    answer: int
    problem_type: str
    operations: tuple  # (start, (op, operand), ...)


@dataclass(frozen=True)
class ProblemSplits:
    train: tuple[Problem, ...]
    test: tuple[Problem, ...]
    problem_types: tuple[str, ...]  # the label names, in label order


def evaluate_operations(operations: tuple) -> int:
    """The value of a chain ``(start, (op, operand), ...)`` applied left to right."""
    value = operations[0]
    for op, operand in operations[1:]:
        if op == "/" and value % operand:
            raise ValueError(f"{value} / {operand} is not a whole number")
        value = _OPS[op](value, operand)
    return value


def _problem(kind: str, rng: random.Random) -> tuple[str, tuple]:
    """The text (without the instruction) and operation chain of one problem of ``kind``."""
    (name, pron), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    Pron = pron.capitalize()
    r = rng.randint
    if kind == "add":
        a, b = r(2, 60), r(2, 60)
        return (f"{name} has {a} {thing}. {Pron} gets {b} more. "
                f"How many {thing} does {name} have now?", (a, ("+", b)))
    if kind == "subtract":
        a = r(10, 99)
        b = r(1, a - 1)
        return (f"{name} has {a} {thing} and gives {b} of them to {friend}. "
                f"How many {thing} does {name} have left?", (a, ("-", b)))
    if kind == "multiply":
        a, b = r(2, 9), r(2, 12)
        return (f"{name} buys {a} boxes of {thing}. Each box holds {b} {thing}. "
                f"How many {thing} does {name} buy?", (a, ("*", b)))
    if kind == "divide":
        b, each = r(2, 9), r(2, 12)
        return (f"{name} shares {b * each} {thing} equally among {b} friends. "
                f"How many {thing} does each friend get?", (b * each, ("/", b)))
    if kind == "add_add":
        a, b, c = r(2, 40), r(2, 40), r(2, 40)
        return (f"{name} collects {a} {thing} on Monday, {b} on Tuesday and {c} on Wednesday. "
                f"How many {thing} does {name} collect in total?", (a, ("+", b), ("+", c)))
    if kind == "add_subtract":
        a, b = r(5, 50), r(2, 30)
        c = r(1, a + b - 1)
        return (f"{name} has {a} {thing}. {Pron} buys {b} more and then gives {c} to {friend}. "
                f"How many {thing} does {name} have now?", (a, ("+", b), ("-", c)))
    if kind == "subtract_subtract":
        a = r(20, 99)
        b = r(1, a // 2)
        c = r(1, a - b - 1)
        return (f"{name} has {a} {thing}. {Pron} gives {b} to {friend} and loses {c}. "
                f"How many {thing} does {name} have left?", (a, ("-", b), ("-", c)))
    if kind == "multiply_add":
        a, b, c = r(2, 9), r(2, 10), r(1, 30)
        return (f"{name} has {c} {thing}. {Pron} buys {a} bags with {b} {thing} in each bag. "
                f"How many {thing} does {name} have now?", (a, ("*", b), ("+", c)))
    if kind == "multiply_subtract":
        a, b = r(2, 9), r(2, 10)
        c = r(1, a * b - 1)
        return (f"{name} buys {a} packs of {b} {thing} and gives {c} of them to {friend}. "
                f"How many {thing} does {name} have left?", (a, ("*", b), ("-", c)))
    if kind == "divide_add":
        b, each, c = r(2, 9), r(2, 12), r(1, 20)
        return (f"{name} shares {b * each} {thing} equally among {b} friends. Each friend "
                f"already had {c} {thing}. How many {thing} does each friend have now?",
                (b * each, ("/", b), ("+", c)))
    raise ValueError(f"unknown problem type '{kind}'")


PROBLEM_TYPES = ("add", "subtract", "multiply", "divide", "add_add", "add_subtract",
                 "subtract_subtract", "multiply_add", "multiply_subtract", "divide_add")


def response_text(operations: tuple) -> str:
    """The training response of an arithmetic problem: its worked solution, one equation per
    operation, the last one ending in the answer ("5 * 6 = 30. 30 + 4 = 34.").

    Why the equations and not the bare number: SmolLM2-135M cannot do two-digit arithmetic "in
    its head" (greedy "17 + 25 =" continuations of the base model are right 0-8 % of the time,
    measured), and a LoRA fine-tune on bare-number answers lowers the loss without raising exact
    match in a CPU budget (0.025-0.05 after 100 steps). Written out one operation at a time, the
    model only has to copy the numbers from the problem and apply one operation to a number it
    has just written: a centralised LoRA probe (r=8 on q/v, 100 steps of 8) went from 0.08 to
    1.0 exact match on small-number problems. This is the GSM8K format (a worked solution whose
    last number is the answer, read by ``last_number``), kept short: no instruction in the
    prompt and no closing "The answer is N." sentence, which cost ~20 % more tokens per step
    and per generated answer and teach nothing the equations do not."""
    value, equations = operations[0], []
    for op, operand in operations[1:]:
        result = evaluate_operations((value, (op, operand)))
        equations.append(f"{value} {op} {operand} = {result}.")
        value = result
    return " ".join(equations)


def arithmetic_problems(train_size: int = 2000, test_size: int = 200) -> ProblemSplits:
    """Deterministic GSM8K-style word problems: ``train_size`` and ``test_size`` distinct prompts.

    Problem types cycle in ``PROBLEM_TYPES`` order (balanced labels); names, objects and numbers
    come from a ``random.Random`` with a fixed seed of its own, so the result never depends on
    global RNG state. The split is fixed by ``fedlora.tasks.data.in_test_split`` on the prompt (a
    stable hash) with the test fraction ``test_size / (train_size + test_size)``; problems are
    drawn until both splits are full (those for a full split are skipped), so a prompt's side
    never depends on the sizes asked for beyond that fraction."""
    if train_size < 1 or test_size < 1:
        raise ValueError("train_size and test_size must be at least 1")
    rng = random.Random(12)  # the data's own seed: the data set is part of the code
    fraction = test_size / (train_size + test_size)
    train, test, seen = [], [], set()
    index = 0
    while len(train) < train_size or len(test) < test_size:
        if index > 100 * (train_size + test_size):
            raise ValueError("too few distinct problems for the sizes asked for")
        kind = PROBLEM_TYPES[index % len(PROBLEM_TYPES)]
        index += 1
        text, operations = _problem(kind, rng)
        prompt = text
        if prompt in seen:
            continue
        seen.add(prompt)
        side = test if in_test_split(prompt, fraction) else train
        limit = test_size if side is test else train_size
        if len(side) < limit:
            side.append(Problem(prompt, evaluate_operations(operations), kind, operations))
    return ProblemSplits(tuple(train), tuple(test), PROBLEM_TYPES)


# ---------------------------------------------------------------------------------------------
# SFT encoding, batching and loss
# ---------------------------------------------------------------------------------------------


class ResponseTooLong(ValueError):
    """The response (with EOS) does not fit in ``max_length`` with at least one prompt token."""


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions, the token id on response positions
    truncated: bool  # the prompt was cut from the left to fit max_length


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def split_messages(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """A chat ending in an assistant turn -> (the turns before it, the assistant's text)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chat example must end with an assistant message (the response)")
    return list(messages[:-1]), messages[-1]["content"]


def prompt_ids(tokenizer, prompt, use_chat_template: bool) -> list[int]:
    """The token ids the model reads before its response, the same in training and generation.

    ``prompt`` is a string or a list of chat messages. With ``use_chat_template`` and a tokenizer
    that has a template, it is rendered with ``add_generation_prompt=True`` (a string becomes one
    user turn); otherwise a string is tokenized as is, with the tokenizer's special tokens."""
    if use_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds every special token the model expects.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise ValueError("chat messages need a tokenizer with a chat template "
                         "(or use_chat_template on)")
    return tokenizer(prompt)["input_ids"]


def encode_example(tokenizer, prompt, response: str | None, max_length: int,
                   use_chat_template: bool = True) -> SFTExample:
    """Token ids and labels of one SFT example: prompt tokens masked with -100, loss on the
    response and the EOS appended to it (so the model learns to stop).

    ``prompt`` is a string or chat messages; with ``response=None`` the messages must end in the
    assistant turn, which is the response. Longer than ``max_length``: the prompt loses tokens
    from the left (its end, next to the response, matters most) and ``truncated`` is set. Raises
    ``ResponseTooLong`` if the response and EOS need more than ``max_length - 1`` tokens: at
    least one prompt token must precede it, since position t's logits predict token t + 1."""
    if response is None:
        prompt, response = split_messages(prompt)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn to stop")
    context = prompt_ids(tokenizer, prompt, use_chat_template)
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    if len(answer) > max_length - 1:
        raise ResponseTooLong(f"a response needs {len(answer)} tokens with EOS but max_length is "
                              f"{max_length} (one more for the prompt): raise max_length to at "
                              f"least {len(answer) + 1}")
    truncated = len(context) + len(answer) > max_length
    if truncated:
        context = context[len(context) + len(answer) - max_length:]
    if not context:
        raise ValueError("the prompt renders to no tokens: nothing predicts the first response token")
    return SFTExample(context + answer, [IGNORE_INDEX] * len(context) + answer, truncated)


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ``input_ids`` with ``pad_id``, ``labels`` with
    -100, ``attention_mask`` 1 on real tokens."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def per_example_sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean cross-entropy over its response tokens, shape (batch,).

    ``logits[:, t]`` predicts token ``t + 1``, so logits and labels are shifted by one; positions
    labelled -100 (prompt, padding) carry no loss. An example without response tokens is an
    error (its mean is undefined)."""
    predicted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no response tokens to compute a loss on")
    return token_loss.sum(dim=1) / counts


def per_example_response_loss(model, batch: dict) -> torch.Tensor:
    """``per_example_sft_loss`` of ``model`` on ``batch``, with the LM head applied only where
    the loss reads it: the positions whose next token is a response token.

    The head of a causal LM maps every position to the whole vocabulary (SmolLM2: 49 152 words)
    and the loss takes a softmax over each, yet only response positions carry loss (about a
    fifth of an arithmetic batch: the prompt and padding are the rest). So the base model's
    hidden states are computed, the response positions selected (across the batch, example by
    example), and the head applied to them alone. Equal to the full computation to float
    rounding. The full path remains for a model ``response_head_applies`` says no to (its logits
    are more than ``head(hidden)``, e.g. soft-capped), and for a trained head under DP-SGD
    (Opacus' per-example gradients of the head need the batch dimension the selection
    flattens)."""
    causal_lm = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the model
    head = causal_lm.get_output_embeddings()
    per_example_head = causal_lm is not model and any(p.requires_grad for p in head.parameters())
    if not getattr(causal_lm, "response_head_applies", False) or per_example_head:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_sft_loss(logits, batch["labels"])
    labels = batch["labels"]
    reads = torch.zeros_like(labels, dtype=torch.bool)
    reads[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t's logits predict token t + 1
    counts = reads.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no response tokens to compute a loss on")
    hidden = causal_lm.base_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    logits = head(hidden[reads]).float()  # (response tokens in the batch, vocabulary)
    token_loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][reads[:, :-1]],
                                                   reduction="none")
    rows = reads.nonzero()[:, 0]
    return token_loss.new_zeros(len(labels)).index_add(0, rows, token_loss) / counts


def response_head_applies(model) -> bool:
    """Whether ``model``'s logits are exactly its output embedding applied to its base model's
    last hidden state, so that ``per_example_response_loss`` may apply the head to some
    positions only. Some causal LMs scale or soft-cap their logits after the head (Gemma 2,
    Cohere, Granite) and transformers has no flag that says so: so a forward pass on a few
    tokens is watched at the head, and its input and output must equal, bit for bit, the base
    model's hidden state and the logits returned (a soft cap changes the bits of even tiny
    logits). Any difference, or a model built otherwise: the full head, as before."""
    head, base = model.get_output_embeddings(), model.base_model
    if head is None or base is model:
        return False
    seen = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.arange(1, 9, device=_device_of(model)).unsqueeze(0) % model.config.vocab_size
            logits = model(input_ids=ids, use_cache=False).logits
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    except (AttributeError, TypeError, ValueError):  # a base model called differently
        return False
    finally:
        hook.remove()
        model.train(was_training)
    return (len(seen) == 1 and torch.equal(seen[0][0], hidden)
            and torch.equal(seen[0][1], logits))


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch mean of per-example mean response losses.

    Not the token mean over the batch (Hugging Face's default ``labels=`` loss): that weighs an
    example by its number of response tokens, so long responses would dominate and an example's
    influence would depend on the batch it lands in. DP-SGD clips per example, so the loss of an
    example must be a function of that example alone; with the batch mean on top this matches
    Opacus' ``loss_reduction="mean"``."""
    return per_example_sft_loss(logits, labels).mean()


# ---------------------------------------------------------------------------------------------
# Decoding and scoring
# ---------------------------------------------------------------------------------------------


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (decoder-only models often
    have no pad token; padded positions are masked, so which id it is does not matter)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence, max_new_tokens: int = 16,
                     batch_size: int = 16, use_chat_template: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (strings or chat messages), decoded without special
    tokens, in the order given. Batches are LEFT-padded (every prompt ends where generation
    starts) and sorted by length to waste little on padding; works with any Hugging Face causal
    LM (``model.generate``)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    pad = pad_token_id(tokenizer)
    encoded = [prompt_ids(tokenizer, prompt, use_chat_template) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, index in enumerate(rows):
                ids = encoded[index]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(input_ids=input_ids.to(device),
                                    attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, index in enumerate(rows):
                answers[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


# A number: optional sign (a '-' right after a letter, digit or '.' is not a sign), digits
# with optional thousands commas, optional decimals (a '.' must be followed by a digit).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text``, as a float for numeric comparison; None if there is none.

    Rule: thousands commas are removed ("1,234" is 1234); a leading '-' is a sign unless it
    follows a letter, digit or '.' ("-3" is -3, "10-3" is 10 and 3); decimals need a digit after
    the point ("3.50" is 3.5, and the '.' ending "is 42." is not part of 42)."""
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def normalised_text(text: str) -> str:
    """Whitespace collapsed to single spaces and stripped: exact match of free-form text."""
    return " ".join(text.split())


def regex_answer(pattern: str) -> Callable[[str], str | None]:
    """A rule that extracts the first capture group of the first match of ``pattern`` (None if
    it does not match), whitespace-normalised. Raises ``ValueError`` for a pattern that does not
    compile or has no capture group."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"the answer pattern {pattern!r} is not a regular expression: {error}")
    if compiled.groups < 1:
        raise ValueError(f"the answer pattern {pattern!r} has no capture group: put the answer "
                         "in ( )")

    def extract(text: str) -> str | None:
        match = compiled.search(text)
        return None if match is None or match.group(1) is None else normalised_text(match.group(1))

    return extract


def exact_match(predictions: Sequence[str], references: Sequence[str],
                rule: Callable[[str], object] = last_number) -> float:
    """The fraction of predictions whose extracted answer equals the reference's.

    The same ``rule`` extracts from both (references are responses in the training format); a
    prediction the rule finds nothing in is wrong. A reference it finds nothing in raises
    ``ValueError``: the rule does not fit the data."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    correct = 0
    for prediction, reference in zip(predictions, references):
        expected = rule(str(reference))
        if expected is None:
            raise ValueError(f"the answer rule finds no answer in the reference {reference!r}")
        correct += rule(prediction) == expected
    return correct / len(references)


@torch.no_grad()
def mean_response_loss(model, tokenizer, examples: Sequence[tuple], max_length: int,
                       batch_size: int = 16, use_chat_template: bool = True) -> float:
    """The mean over ``examples`` ((prompt, response) pairs) of each one's mean response loss,
    teacher-forced, as training computes it (``per_example_response_loss``)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    pad = pad_token_id(tokenizer)
    encoded = [encode_example(tokenizer, p, r, max_length, use_chat_template) for p, r in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    total = 0.0
    try:
        for start in range(0, len(order), batch_size):
            batch = collate_sft([encoded[i] for i in order[start:start + batch_size]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            total += per_example_response_loss(model, batch).sum().item()
    finally:
        model.train(was_training)
    return total / len(encoded)


def evaluate_generation(model, tokenizer, examples: Sequence[tuple], max_length: int,
                        max_new_tokens: int = 16, batch_size: int = 16,
                        use_chat_template: bool = True,
                        rule: Callable[[str], object] = last_number) -> dict:
    """Exact match of greedy answers to ``examples`` ((prompt, reference response) pairs) under
    ``rule``, and the mean response loss (``eval_loss``)."""
    prompts = [prompt for prompt, _ in examples]
    references = [response for _, response in examples]
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size,
                                   use_chat_template)
    return {"exact_match": exact_match(predictions, references, rule),
            "eval_loss": mean_response_loss(model, tokenizer, examples, max_length, batch_size,
                                            use_chat_template)}


# ---------------------------------------------------------------------------------------------
# The tasks: arithmetic (embedded) and sft (the user's prompt/response data)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSplit:
    """One split: prompts (strings, or chat messages as tuples of dicts), their reference
    responses and integer partition labels."""

    prompts: tuple
    responses: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class PairDataset:
    train: PairSplit
    test: PairSplit
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


class SFTBatches(ExampleBatches):
    """Encoded SFT examples of one split (``encode_example``), right-padded per batch
    (``collate_sft``). ``truncated``: how many lost prompt tokens to fit ``max_length``."""

    def __init__(self, tokenizer, split: PairSplit, max_length: int):
        self.examples = [encode_example(tokenizer, prompt, response, max_length)
                         for prompt, response in zip(split.prompts, split.responses)]
        self.labels = torch.tensor(list(split.labels), dtype=torch.long)
        self.truncated = sum(example.truncated for example in self.examples)
        self.pad_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices) -> dict[str, torch.Tensor]:
        return collate_sft([self.examples[i] for i in indices], self.pad_id)


_ENCODED: dict[tuple, tuple] = {}  # (split, tokenizer, max_length) ids -> (split, tokenizer, batches)


def encoded_split(tokenizer, split: PairSplit, max_length: int) -> SFTBatches:
    """``SFTBatches`` of ``split``, encoded once per process; a response that cannot fit is a
    one-line ``ConfigError`` naming ``max_length``."""
    key = (id(split), id(tokenizer), max_length)
    if key not in _ENCODED:  # the value holds split and tokenizer, so their ids stay theirs
        _ENCODED[key] = (split, tokenizer, checked_batches(tokenizer, split, max_length))
    return _ENCODED[key][2]


def checked_batches(tokenizer, split: PairSplit, max_length: int) -> SFTBatches:
    """``SFTBatches(...)``, with encoding errors as one-line ``ConfigError``s."""
    try:
        return SFTBatches(tokenizer, split, max_length)
    except ResponseTooLong as error:
        raise ConfigError(f"max_length={max_length} is too short: {error}") from error
    except ValueError as error:  # e.g. a prompt that renders to no tokens
        raise ConfigError(f"{error}; fix the data (data.prompt_field) or max_length") from error


def _causal_lm_or_error(path: str, model_name: str, task: str) -> None:
    """A local model folder whose config.json names no causal-LM architecture cannot generate."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a Hub id: transformers' loader reports what is wrong with it
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config.json: the loader's error names it
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ConfigError(f"model='{model_name}' is not a causal language model (its config.json "
                          f"names {', '.join(architectures)}); task={task} generates text: give "
                          "a causal LM (an ...ForCausalLM folder or Hub id, e.g. model=smollm2), "
                          "or use a classification task")


def answer_rule(name: str, pattern: str | None) -> Callable[[str], object]:
    """The answer exact match compares (``eval.answer``): ``last_number``, ``text``
    (whitespace-normalised) or ``regex`` (the first group of ``eval.pattern``)."""
    if name == "last_number":
        return last_number
    if name == "text":
        return normalised_text
    if not pattern:
        raise ConfigError("eval.answer=regex needs eval.pattern, a regular expression whose first "
                          "group is the answer; set eval.pattern")
    try:
        return regex_answer(pattern)
    except ValueError as error:
        raise ConfigError(f"eval.pattern: {error}") from error


@dataclass(frozen=True)
class Generation(Task):
    """Supervised fine-tuning of a causal LM on (prompt, response) pairs, scored by exact match
    of greedy answers (``evaluate_generation``) and the held-out response loss."""

    default_model = "smollm2"  # fedlora.model.embedded_llm.EMBEDDED_LLM
    default_max_length = 192
    # A SmolLM2-135M LoRA step (batch 8, ~70 tokens) takes ~1.6-3.3 s on a CPU core: 10 rounds
    # of 2 clients x 8 steps, scored every 5 rounds, take ~5-10 min on 2 cores.
    run_defaults = {"rounds": 10, "local_steps": 8, "batch_size": 8, "eval_every": 5,
                    "clients_per_round": 2}
    default_max_examples: ClassVar[int | None] = None  # eval.max_examples null: every example
    metrics = ("exact_match", "eval_loss")
    training_data_counts = ("truncated_train_examples",)
    default_answer = "text"

    @property
    def rule(self) -> Callable[[str], object]:
        return answer_rule(self.evaluation.answer or self.default_answer, self.evaluation.pattern)

    def check(self) -> None:
        self.rule  # noqa: B018 (a bad eval.answer/eval.pattern fails now)

    def check_model(self, path: str) -> None:
        _causal_lm_or_error(path, path, self.name)

    @classmethod
    def load_pretrained(cls, path: str, spec, options: dict) -> tuple:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _causal_lm_or_error(path, spec.name, cls.name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **options)
        if tokenizer.pad_token is None:  # padded positions are masked: any id will do
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.response_head_applies = response_head_applies(model)  # read by ``loss``
        return model, tokenizer, frozenset()  # no head: only adapter tensors travel

    def training_examples(self, tokenizer, max_length: int) -> SFTBatches:
        return encoded_split(tokenizer, self.dataset().train, max_length)

    @staticmethod
    def loss(model, batch: dict, reduction: str = "mean"):
        """Each example's mean response-token loss (``per_example_response_loss``), reduced."""
        return reduce_loss(per_example_response_loss(model, batch), reduction)

    def scored(self, test: PairSplit) -> list[tuple]:
        """The (prompt, response) pairs evaluation scores: the first ``eval.max_examples``."""
        count = min(self.evaluation.max_examples or self.default_max_examples or len(test), len(test))
        return list(zip(test.prompts[:count], test.responses[:count]))

    def evaluator(self, bundle, test: PairSplit, max_length: int, device: str):
        examples, rule = self.scored(test), self.rule
        return lambda: evaluate_generation(bundle.model, bundle.tokenizer, examples, max_length,
                                           self.evaluation.max_new_tokens,
                                           self.evaluation.batch_size, rule=rule)

    def example_report(self, tokenizer, data: PairDataset, max_length: int) -> dict:
        """Truncated examples (prompts cut from the left) of the training split and of the
        scored test examples; checks too that the answer rule finds an answer in every scored
        reference (else exact match would fail at the first evaluation)."""
        examples = self.scored(data.test)
        rule, answer = self.rule, self.evaluation.answer or self.default_answer
        for _, response in examples:
            if rule(response) is None:
                raise ConfigError(f"eval.answer={answer} finds no answer in the test response "
                                  f"{response[:60]!r}; set eval.answer (last_number | text | "
                                  "regex with eval.pattern) to a rule that fits the data")
        test = PairSplit(tuple(p for p, _ in examples), tuple(r for _, r in examples),
                         data.test.labels[:len(examples)])
        return {"truncated_train_examples": encoded_split(tokenizer, data.train, max_length).truncated,
                "truncated_test_examples": checked_batches(tokenizer, test, max_length).truncated}


@dataclass(frozen=True)
class Arithmetic(Generation):
    """The embedded generative default: ``arithmetic_problems`` (problem type = label), scored
    by the last number of the answer."""

    default_answer = "last_number"
    default_max_examples = 50  # greedy decoding costs ~0.3-0.7 s per prompt on 2 CPU cores

    def check(self) -> None:
        super().check()
        if self.data.path or self.data.name:
            raise ConfigError(f"task={self.name} is the embedded arithmetic data; drop data.path/"
                              "data.name, or use task=sft for your prompt/response data")

    def load(self) -> PairDataset:
        problems = arithmetic_problems()

        def split(items) -> PairSplit:
            return PairSplit(tuple(p.prompt for p in items),
                             tuple(response_text(p.operations) for p in items),
                             tuple(PROBLEM_TYPES.index(p.problem_type) for p in items))

        return PairDataset(split(problems.train), split(problems.test), problems.problem_types)


def _pairs(rows: list[tuple[int, dict]], spec: DataSpec, where: str) -> tuple[list, list, list]:
    """Prompts, responses and raw labels of rows: a ``messages`` list (a chat ending in the
    assistant's response) or the ``data.prompt_field``/``data.response_field`` columns."""
    if not rows:
        raise ConfigError(f"data.path '{where}' has no rows; give a non-empty .jsonl or .csv file")
    prompts, responses, labels = [], [], []
    for number, row in rows:
        if isinstance(row.get("messages"), list):
            try:
                prompt, response = split_messages(row["messages"])
            except (ValueError, KeyError, AttributeError) as error:
                raise ConfigError(f"'{where}' line {number}: its messages {error}; end each chat "
                                  "with an assistant message") from error
            prompt = tuple(prompt)
        else:
            for key, field in (("data.prompt_field", spec.prompt_field),
                               ("data.response_field", spec.response_field)):
                if row.get(field) is None:
                    if field not in rows[0][1]:
                        raise ConfigError(f"{key}='{field}' is not a column of '{where}' (columns: "
                                          f"{', '.join(map(str, rows[0][1]))}); set {key} to one "
                                          "of them, or give chat 'messages' lists")
                    raise ConfigError(f"'{where}' line {number} has no '{field}' ({key}); add it "
                                      "to that row or remove the row")
            prompt, response = str(row[spec.prompt_field]), row[spec.response_field]
        if not str(response).strip():
            raise ConfigError(f"'{where}' line {number} has an empty response "
                              f"(data.response_field='{spec.response_field}'); the model would "
                              "learn nothing from it: fill it in or remove the row")
        prompts.append(prompt)
        responses.append(str(response))
        labels.append(row.get(spec.label_field, 0))  # no label column: one partition label
    return prompts, responses, labels


def _split_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(list(prompt), sort_keys=True)


def _pair_dataset(train: tuple[list, list, list], test: tuple[list, list, list] | None,
                  test_fraction: float) -> PairDataset:
    if test is None:  # one file: the fixed hash split on the prompt
        sides = ([], [], []), ([], [], [])
        for example in zip(*train):
            side = sides[1] if in_test_split(_split_key(example[0]), test_fraction) else sides[0]
            for column, value in zip(side, example):
                column.append(value)
        train, test = sides
    y_train, y_test, names = encode_labels(train[2], test[2])
    if not test[0]:
        raise ConfigError("the test split is empty; give a test file or raise data.test_fraction")
    return PairDataset(PairSplit(tuple(train[0]), tuple(map(str, train[1])), tuple(y_train)),
                       PairSplit(tuple(test[0]), tuple(map(str, test[1])), tuple(y_test)), names)


@dataclass(frozen=True)
class SFT(Generation):
    """The user's prompt/response data (``data.path`` JSONL/CSV or ``data.name``), scored by
    the whitespace-normalised response by default."""

    def check(self) -> None:
        super().check()
        if not (self.data.path or self.data.name):
            raise ConfigError(f"task={self.name} reads your prompt/response data: set data.path "
                              "(or data.name), or use task=arithmetic for the embedded data")

    def load(self) -> PairDataset:
        spec = self.data
        if spec.path:
            (rows, where), test = split_files(spec)
            return _pair_dataset(_pairs(rows, spec, where),
                                 None if test is None else _pairs(test[0], spec, test[1]),
                                 spec.test_fraction)
        import datasets

        try:
            hub = datasets.load_dataset(spec.name)
        except Exception as error:  # network, unknown id, auth: all one-line config errors
            raise ConfigError(f"data.name='{spec.name}' could not be loaded ({type(error).__name__}"
                              f"); check the id and network access, or use data.path") from error
        if "train" not in hub:
            raise ConfigError(f"data.name='{spec.name}' has no 'train' split (splits: {', '.join(hub)})")

        def rows(split: str):
            return _pairs(list(enumerate(hub[split].to_list(), start=1)), spec,
                          f"{spec.name}[{split}]")

        return _pair_dataset(rows("train"), rows("test") if "test" in hub else None,
                             spec.test_fraction)


register_task("arithmetic", Arithmetic)
register_task("sft", SFT)
