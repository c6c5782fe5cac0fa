"""Label masks: exact counts for single-turn, multi-turn and chat-template records."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from alpaca_cot.data.encoding import IGNORE_INDEX, encode_records, share_budget
from alpaca_cot.data.templates import ALPACA_PROMPT_NO_INPUT, Template, get_template
from tests.conftest import shared_path
from tests.data_helpers import count_trainable


@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K-hf"))


@pytest.fixture(scope="module")
def qwen_tok():
    return AutoTokenizer.from_pretrained(shared_path("models", "qwen3-tokenizer"))


def test_seed_alpaca_text_is_exact(llama_tok) -> None:
    template = get_template("alpaca", llama_tok)
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert template.render_prompt(record) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:")
    with_input = template.render_prompt({"instruction": "Add.", "input": "2 and 3"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input that "
                                 "provides further context.")
    assert with_input.endswith("### Input:\n2 and 3\n\n### Response:")


def test_single_turn_mask_counts(llama_tok) -> None:
    record = {"instruction": "Name a color.", "input": "", "output": "Blue sky."}
    [enc] = encode_records([record], get_template("alpaca", llama_tok), llama_tok, cutoff_len=512)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Name a color.")
    n_prompt = len(llama_tok(prompt)["input_ids"])  # with <s>
    n_full = len(llama_tok(prompt + " Blue sky.")["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert count_trainable(enc) == n_full - n_prompt + 1  # the answer and EOS
    assert enc.input_ids[-1] == llama_tok.eos_token_id == enc.labels[-1]
    assert llama_tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "Blue sky.</s>"


def test_train_on_inputs_labels_everything(llama_tok) -> None:
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    [enc] = encode_records([record], get_template("alpaca", llama_tok), llama_tok, 512, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_a_cut_answer_does_not_end_in_eos(llama_tok) -> None:
    # Teaching EOS at a cut would teach the model to stop mid-answer.
    record = {"instruction": "Tell a story.", "input": "", "output": "Once upon a time " * 50}
    [enc] = encode_records([record], get_template("alpaca", llama_tok), llama_tok, cutoff_len=200)
    assert len(enc.input_ids) == 200 < enc.full_length
    assert llama_tok.eos_token_id not in enc.input_ids and llama_tok.eos_token_id not in enc.labels
    assert enc.labels[-1] == enc.input_ids[-1] != IGNORE_INDEX  # the cut answer is still trained on


def test_share_budget_is_llama_factorys_rule() -> None:
    assert share_budget(10, 20, 100) == (10, 20)  # fits: nothing cut
    assert share_budget(300, 40, 100) == (60, 40)  # an answer under half the budget is kept whole
    assert share_budget(30, 300, 100) == (30, 70)  # a short prompt is kept whole
    assert share_budget(300, 100, 100) == (75, 25)  # both long: in proportion


def test_a_long_prompt_keeps_its_start_and_its_response_marker(llama_tok) -> None:
    record = {"instruction": "Summarise.", "input": "lorem ipsum " * 200, "output": "Short."}
    template = get_template("alpaca", llama_tok)
    [enc] = encode_records([record], template, llama_tok, cutoff_len=120)
    assert len(enc.input_ids) == 120 < enc.full_length
    text = llama_tok.decode(enc.input_ids)
    assert text.startswith("<s>") and "Below is an instruction" in text
    assert text.endswith("### Response: Short.</s>")  # the whole answer and its true EOS
    assert llama_tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "Short.</s>"


def test_a_long_conversation_keeps_its_leading_whole_turns(llama_tok) -> None:
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Question {i}: " + "why is the sky blue " * 6},
                  {"role": "assistant", "content": f"Answer {i}: " + "because of scattering " * 6}]
    template = get_template("alpaca", llama_tok)
    full = encode_records([{"messages": turns}], template, llama_tok, cutoff_len=4096)[0]
    [enc] = encode_records([{"messages": turns}], template, llama_tok, cutoff_len=len(full.input_ids) - 5)
    assert len(enc.input_ids) < enc.full_length and enc.input_ids == full.input_ids[:len(enc.input_ids)]
    # It ends at the true end of an answer: the last label is that answer's EOS, never user text.
    assert enc.labels[-1] == enc.input_ids[-1] == llama_tok.eos_token_id
    trained = llama_tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert trained.count("</s>") == 3 and "Answer 2:" in trained and "Answer 3" not in trained
    assert "Question 3" not in llama_tok.decode(enc.input_ids)


def test_a_cut_chat_conversation_ends_with_the_templates_end_marker(qwen_tok) -> None:
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"Question {i}: " + "why is the sky blue " * 6},
                     {"role": "assistant", "content": f"Answer {i}: " + "because of scattering " * 6}]
    template = get_template("chat", qwen_tok)
    full = encode_records([{"messages": messages}], template, qwen_tok, cutoff_len=4096)[0]
    [enc] = encode_records([{"messages": messages}], template, qwen_tok, cutoff_len=len(full.input_ids) - 20)
    assert qwen_tok.decode(enc.input_ids[-1:]) == "<|im_end|>" == qwen_tok.decode(enc.labels[-1:])
    assert qwen_tok.eos_token_id not in enc.labels or qwen_tok.eos_token == "<|im_end|>"
    assert "Answer 3" not in qwen_tok.decode(enc.input_ids)


def test_multiturn_only_assistant_turns_carry_loss(llama_tok) -> None:
    record = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "See you."}]}
    template = get_template("alpaca", llama_tok)
    [enc] = encode_records([record], template, llama_tok, cutoff_len=512)
    text = "".join(t for t, _ in template.render(record))
    assert text.startswith("Below is an multi-round dialogue between human and assistant.")
    assert "### Human: Hi.\n### Assistant: Hello.\n### Human: Bye.\n### Assistant: See you." in text
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    assert trained.count(llama_tok.eos_token_id) == 2
    assert llama_tok.decode(trained) == "Hello.</s> See you.</s>"
    # Exact count: each answer's own tokens in context plus one EOS each.
    segments = template.render(record)
    expected = 0
    for i, (_, trainable) in enumerate(segments):
        if trainable:
            before = "".join(t for t, _ in segments[:i])
            expected += len(llama_tok(before + segments[i][0])["input_ids"]) - len(llama_tok(before)["input_ids"]) + 1
    assert count_trainable(enc) == expected


def test_chat_template_ids_equal_apply_chat_template(qwen_tok) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    template = get_template("chat", qwen_tok)
    [enc] = encode_records([{"messages": messages}], template, qwen_tok, cutoff_len=512)
    reference = qwen_tok.apply_chat_template(messages, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert enc.input_ids == list(reference)
    assert qwen_tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == \
        "Hello! How can I help?<|im_end|>4<|im_end|>"
    prompt = template.render_prompt({"messages": messages[:4]}, qwen_tok)
    assert prompt == qwen_tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)


def test_template_round_trips_through_json(tmp_path, qwen_tok) -> None:
    template = get_template("chat", qwen_tok)
    template.save(str(tmp_path))
    assert Template.load(str(tmp_path)) == template


def test_cut_response_cuts_at_the_earliest_stop_string() -> None:
    import dataclasses

    template = dataclasses.replace(Template(name="alpaca"), stop_strings=("r i", "wer"))
    assert template.cut_response("the answer is 4") == "the ans"  # "wer" starts first, though "r i" is listed first
    assert template.cut_response("plain") == "plain"
