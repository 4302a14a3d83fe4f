"""Chat templates: the Python renderer, its Jinja twin, and the exact strings each format makes."""

from __future__ import annotations

from itertools import pairwise

import jinja2
import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import (
    TEMPLATES,
    get_template,
    jinja_template,
    render,
    render_prompt,
    render_segments,
    to_messages,
)
from loraforge.errors import LoraforgeError

EOS, BOS = "</s>", "<s>"


def conv(*texts: str, system: str | None = None) -> Conversation:
    turns = (Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts))
    return Conversation(tuple(turns), system)


CONVERSATIONS = {
    "single": conv("What is 2+2?", "4"),
    "system": conv("Hi", "Hello!", system="Be brief."),
    "empty-system": conv("Hi", "Hello!", system=""),
    "multi": conv(
        "Name a colour.", "Red.", "Another?", "Blue.", "And one more?", "Green.", system="Be brief."
    ),
    "multi-default-system": conv("一", "二", "三", "四"),
    "chinese": conv(
        "请用一句话介绍北京：它是什么？",
        "北京是中国的首都，有三千多年历史。",
        system="你是一个助手（简洁）。",
    ),
    "jinja-ish": conv(
        "Print {{ x }} and {% if %} and %}{# #}",
        " {user}{system}{bos} \\n '\" \n",
        system="{{ eos_token }} %} {{",
    ),
    "whitespace": conv("  two spaces\n\n", "\tanswer with tab \n"),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A real transformers tokenizer — apply_chat_template is what the trained model ships with."""
    vocab = {"<unk>": 0, BOS: 1, EOS: 2}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), bos_token=BOS, eos_token=EOS
    )


def end_of(name: str) -> str:
    t = TEMPLATES[name]
    return t.end_token if t.end_token is not None else EOS


def learned_of(name: str, answer: str) -> str:
    """An answer as training learns it: LLaMA-Factory's templates (`slots`) also learn the
    lead before it and what follows the end token, and a thinking one the empty thought."""
    t = TEMPLATES[name]
    thought = t.thought_words[0] + t.thought_words[1] if t.thinking and t.enable_thinking else ""
    return thought + t.answer_lead + answer + end_of(name) + t.after_end


def without_last_answer(c: Conversation) -> Conversation:
    return Conversation(c.turns[:-1], c.system)


all_cases = pytest.mark.parametrize(
    "name,conv_id", [(name, conv_id) for name in TEMPLATES for conv_id in CONVERSATIONS]
)


@all_cases
def test_jinja_equals_render_in_transformers(hf_tokenizer, name, conv_id):
    t, c = TEMPLATES[name], CONVERSATIONS[conv_id]
    hf_tokenizer.chat_template = jinja_template(t)
    full = hf_tokenizer.apply_chat_template(to_messages(c), tokenize=False)
    assert full == render(t, c, EOS, bos_token=BOS)
    prompt = hf_tokenizer.apply_chat_template(
        to_messages(without_last_answer(c)), tokenize=False, add_generation_prompt=True
    )
    assert prompt == render_prompt(t, c.system, c.turns[:-1], EOS, bos_token=BOS)


@all_cases
def test_jinja_needs_no_trim_blocks(name, conv_id):
    """llama.cpp's template engine does not set trim_blocks/lstrip_blocks; the output must not depend on them."""
    t, c = TEMPLATES[name], CONVERSATIONS[conv_id]
    plain = jinja2.Environment().from_string(jinja_template(t))
    assert plain.render(messages=to_messages(c), eos_token=EOS, bos_token=BOS) == render(
        t, c, EOS, bos_token=BOS
    )


@all_cases
def test_segments_learn_exactly_the_answers(name, conv_id):
    t, c = TEMPLATES[name], CONVERSATIONS[conv_id]
    segments = render_segments(t, c, EOS, bos_token=BOS)
    assert "".join(text for text, _ in segments) == render(t, c, EOS, bos_token=BOS)
    answers = [learned_of(name, turn.text) for turn in c.turns if turn.role == "assistant"]
    spans, previous = [], False
    for text, learned in segments:
        if learned:
            spans[-1:] = [spans[-1] + text] if previous else [*spans[-1:], text]
        previous = learned
    assert spans == answers
    assert all(text for text, _ in segments)
    if not t.slots:  # a slot template's segments are its slots, each encoded alone, so they need not alternate
        # learned and non-learned alternate: markup after an end token opens the next segment
        assert all(a[1] != b[1] for a, b in pairwise(segments))
    assert segments[-1][1], "nothing may follow the last answer's learned text"


@all_cases
def test_prompt_plus_answer_is_training_text(name, conv_id):
    """At every round, what inference feeds the model + the answer + end token == what training saw."""
    t, c = TEMPLATES[name], CONVERSATIONS[conv_id]
    for index in range(1, len(c.turns), 2):
        prompt = render_prompt(t, c.system, c.turns[:index], EOS, bos_token=BOS)
        so_far = Conversation(c.turns[: index + 1], c.system)
        assert prompt + learned_of(name, c.turns[index].text) == render(t, so_far, EOS, bos_token=BOS)
    # loraforge's templates leave the first BOS to the tokenizer; LLaMA-Factory's write it where it does
    assert render(t, c, EOS).startswith(BOS) == (t.prefix + t.user).startswith("{bos}")


GOLDEN = {
    # LLaMA-Factory's templates, as its slots write them (src/llamafactory/data/template.py)
    ("alpaca", "single"): (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4</s>\n\n"
    ),
    ("alpaca", "system"): "Be brief.### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n",
    ("default", "multi"): (
        "System: Be brief.</s>\nHuman: Name a colour.</s>\nAssistant:Red.</s>\nHuman: Another?</s>\nAssistant:Blue.</s>"
        "\nHuman: And one more?</s>\nAssistant:Green.</s>\n"
    ),
    ("empty", "system"): "Be brief.HiHello!",
    ("llama2", "multi"): (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]Red.</s><s>[INST] Another? [/INST]Blue.</s>"
        "<s>[INST] And one more? [/INST]Green.</s>"
    ),
    ("llama2_zh", "single"): (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nWhat is 2+2? [/INST]4</s>"
    ),
    ("llama3", "system"): (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    ),
    ("mistral", "multi"): (
        "<s>[INST] Be brief.\n\nName a colour.[/INST] Red.</s>[INST] Another?[/INST] Blue.</s>"
        "[INST] And one more?[/INST] Green.</s>"
    ),
    ("chatml", "single"): "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    ("qwen", "single"): (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ),
    ("qwen3", "single"): (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"
    ),
    ("qwen3_nothink", "single"): "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    ("alpaca-joined", "single"): (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4</s>"
    ),
    ("alpaca-joined", "multi"): (
        "Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nRed.</s>"
        "\n\n### Instruction:\nAnother?\n\n### Response:\nBlue.</s>"
        "\n\n### Instruction:\nAnd one more?\n\n### Response:\nGreen.</s>"
    ),
    ("chinese-alpaca", "single"): (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is 2+2?\n\n### Response: 4</s>"
    ),
    ("chinese-alpaca", "empty-system"): "### Instruction:\nHi\n\n### Response: Hello!</s>",
    ("llama2-zh", "single"): (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nWhat is 2+2? [/INST] 4</s>"
    ),
    ("llama2-zh", "multi"): (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] Red.</s>"
        "<s>[INST] Another? [/INST] Blue.</s><s>[INST] And one more? [/INST] Green.</s>"
    ),
    ("llama2-zh", "empty-system"): "[INST] Hi [/INST] Hello!</s>",
    ("llama3-joined", "single"): (
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    ),
    ("llama3-joined", "system"): (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    ),
    ("chatml-joined", "single"): (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"
    ),
    ("chatml-joined", "multi-default-system"): (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n一<|im_end|>\n<|im_start|>assistant\n二<|im_end|>\n"
        "<|im_start|>user\n三<|im_end|>\n<|im_start|>assistant\n四<|im_end|>"
    ),
    ("default-joined", "single"): "Human: What is 2+2?\nAssistant: 4</s>",
    ("default-joined", "multi"): (
        "Be brief.\nHuman: Name a colour.\nAssistant: Red.</s>\nHuman: Another?\nAssistant: Blue.</s>"
        "\nHuman: And one more?\nAssistant: Green.</s>"
    ),
    ("empty-joined", "system"): "Be brief.HiHello!</s>",
    (
        "empty-joined",
        "jinja-ish",
    ): "{{ eos_token }} %} {{Print {{ x }} and {% if %} and %}{# #} {user}{system}{bos} \\n '\" \n</s>",
}


@pytest.mark.parametrize("name,conv_id", sorted(GOLDEN))
def test_golden_strings(name, conv_id):
    assert (
        render(TEMPLATES[name], CONVERSATIONS[conv_id], EOS, bos_token=BOS) == GOLDEN[name, conv_id]
    )


def test_every_template_has_a_golden_string():
    assert {name for name, _ in GOLDEN} == set(TEMPLATES)


GOLDEN_PROMPTS = {
    "alpaca": "Be brief.### Instruction:\nHi\n\n### Response:\n",
    "alpaca-joined": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n",
    "chinese-alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response: ",
    "llama2-zh": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] ",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST]",
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama3-joined": (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "chatml-joined": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "default": "System: Be brief.</s>\nHuman: Hi</s>\nAssistant:",
    "default-joined": "Be brief.\nHuman: Hi\nAssistant: ",
    "empty": "Be brief.Hi",
    "empty-joined": "Be brief.Hi",
}


@pytest.mark.parametrize("name", sorted(GOLDEN_PROMPTS))
def test_golden_generation_prompts(name):
    assert (
        render_prompt(TEMPLATES[name], "Be brief.", [Turn("user", "Hi")], EOS)
        == GOLDEN_PROMPTS[name]
    )


def test_chatml_segments_put_the_newline_after_im_end_in_the_next_prompt():
    segments = render_segments(get_template("chatml-joined"), CONVERSATIONS["multi-default-system"], EOS)
    assert segments == [
        (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n一<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("二<|im_end|>", True),
        ("\n<|im_start|>user\n三<|im_end|>\n<|im_start|>assistant\n", False),
        ("四<|im_end|>", True),
    ]


def test_llama_factory_templates_cut_segments_at_its_slots():
    """qwen: the system slot, each user slot with the assistant prefix, each answer's slot
    with its "\n" (learned: LLaMA-Factory's assistant slot holds it); alpaca: EOS its own piece."""
    assert render_segments(get_template("qwen"), CONVERSATIONS["multi-default-system"], EOS) == [
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n", False),
        ("<|im_start|>user\n一<|im_end|>\n<|im_start|>assistant\n", False),
        ("二<|im_end|>\n", True),
        ("<|im_start|>user\n三<|im_end|>\n<|im_start|>assistant\n", False),
        ("四<|im_end|>\n", True),
    ]
    assert render_segments(get_template("alpaca"), CONVERSATIONS["system"], EOS) == [
        ("Be brief.", False), ("### Instruction:\nHi\n\n### Response:\n", False),
        ("Hello!", True), (EOS, True), ("\n\n", True),
    ]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_system_none_uses_default_and_empty_string_means_none(name):
    t = TEMPLATES[name]
    no_system = render(t, conv("Hi", "Hello!", system=""), EOS)
    with_default = render(t, conv("Hi", "Hello!"), EOS)
    if t.default_system is None:
        assert with_default == no_system
    else:
        assert t.default_system in with_default and t.default_system not in no_system
    assert "Be brief." not in no_system


def test_to_messages_keeps_an_empty_system_and_drops_a_missing_one():
    assert to_messages(conv("q", "a", system="")) == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert to_messages(conv("q", "a"))[0] == {"role": "user", "content": "q"}


def test_unknown_template_names_the_closest():
    with pytest.raises(LoraforgeError, match="did you mean 'chatml'") as err:
        get_template("chatlm")
    for name in TEMPLATES:
        assert name in str(err.value)
    with pytest.raises(LoraforgeError, match="did you mean 'llama3'"):
        get_template("llama-3")


def test_turns_out_of_order_are_an_error_that_says_where():
    bad = Conversation((Turn("assistant", "hi"), Turn("user", "?")), source="data.json:7")
    with pytest.raises(LoraforgeError, match="data.json:7: turn 1 is from 'assistant'"):
        render(get_template("chatml"), bad, EOS)
    with pytest.raises(LoraforgeError, match="end with a user turn"):
        render_prompt(
            get_template("chatml"), None, [Turn("user", "q"), Turn("assistant", "a")], EOS
        )
