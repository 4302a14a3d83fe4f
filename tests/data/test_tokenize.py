"""Ids and labels: the answers (and their end token) are learned, nothing else, and the
prompt of every round has the ids it gets when encoded alone at inference."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import get_template, render_prompt
from loraforge.data.tokenize import IGNORE, encode_conversation, encode_text_blocks, is_truncated

SINGLE = Conversation((Turn("user", "把“你好”翻译成英文。"), Turn("assistant", "Hello.")))
MULTI = Conversation(
    (Turn("user", "中国的首都是哪里？"), Turn("assistant", "北京。"),
     Turn("user", "它有多少人口？"), Turn("assistant", "大约两千一百万人。"),
     Turn("user", "  有什么名胜？ "), Turn("assistant", "故宫、长城和颐和园。")),
    system="你是一个乐于助人的助手。",
)

# (tokenizer kind, template): every loraforge (one-text) template on a SentencePiece
# vocabulary, and the byte-level ones on the vocabulary family they were made for.
# LLaMA-Factory's templates (slot by slot, its ids) are tested in test_lf_templates.py.
CASES = [("spm", name) for name in ("alpaca-joined", "chinese-alpaca", "llama2-zh", "default-joined",
                                    "empty-joined", "chatml-joined")]
CASES += [("llama3", "llama3-joined"), ("qwen2", "chatml-joined")]


@pytest.fixture
def tokenizer_for(spm_tokenizer, bpe_tokenizers):
    def load(kind):
        return AutoTokenizer.from_pretrained(spm_tokenizer if kind == "spm" else bpe_tokenizers[kind])
    return load


def answer_spans(labels):
    spans, current = [], []
    for label in labels:
        if label != IGNORE:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("kind, name", CASES)
@pytest.mark.parametrize("conv", [SINGLE, MULTI], ids=["single", "multi"])
def test_only_answers_and_end_token_are_learned(tokenizer_for, kind, name, conv):
    tokenizer, template = tokenizer_for(kind), get_template(name)
    enc = encode_conversation(tokenizer, template, conv, cutoff_len=4096)
    spans = answer_spans(enc.labels)
    answers = [t.text for t in conv.turns if t.role == "assistant"]
    end = template.end_token or tokenizer.eos_token
    assert [tokenizer.decode(s, skip_special_tokens=False) for s in spans] == [a + end for a in answers]


@pytest.mark.parametrize("kind, name", CASES)
def test_each_round_prompt_has_its_inference_ids(tokenizer_for, kind, name):
    tokenizer, template = tokenizer_for(kind), get_template(name)
    enc = encode_conversation(tokenizer, template, MULTI, cutoff_len=4096)
    starts = [i for i, label in enumerate(enc.labels)
              if label != IGNORE and (i == 0 or enc.labels[i - 1] == IGNORE)]
    if template.assistant.endswith(" "):
        # chinese-alpaca's prompt ends in a space: when a whole history is re-encoded the
        # space merges into the answer's first piece ("▁北京"), which the model generated
        # after a lone "▁". No single encoding satisfies both; the generation point wins.
        starts = starts[:1]
    for round_index, start in enumerate(starts):
        history = MULTI.turns[: 2 * round_index + 1]
        prompt = render_prompt(template, MULTI.system, history, tokenizer.eos_token,
                               bos_token=tokenizer.bos_token or "")
        assert enc.input_ids[:start] == tokenizer.encode(prompt, add_special_tokens=True), round_index


def test_train_on_prompt_and_mask_history(tokenizer_for):
    tokenizer, template = tokenizer_for("spm"), get_template("chinese-alpaca")
    everything = encode_conversation(tokenizer, template, MULTI, cutoff_len=4096, train_on_prompt=True)
    assert everything.labels == everything.input_ids
    last_only = encode_conversation(tokenizer, template, MULTI, cutoff_len=4096, mask_history=True)
    spans = answer_spans(last_only.labels)
    assert [tokenizer.decode(s) for s in spans] == ["故宫、长城和颐和园。" + tokenizer.eos_token]


def test_truncation_keeps_the_start_and_drops_examples_with_nothing_to_learn(tokenizer_for):
    tokenizer, template = tokenizer_for("spm"), get_template("alpaca-joined")
    full = encode_conversation(tokenizer, template, MULTI, cutoff_len=4096)
    cut = encode_conversation(tokenizer, template, MULTI, cutoff_len=len(full.input_ids) - 3)
    assert is_truncated(cut) and cut.full_length == len(full.input_ids) and cut.input_ids == full.input_ids[:-3]
    prompt_len = full.labels.index(next(label for label in full.labels if label != IGNORE))
    assert encode_conversation(tokenizer, template, MULTI, cutoff_len=prompt_len) is None


def test_pretraining_blocks_are_bos_text_eos_streams(tokenizer_for):
    tokenizer = tokenizer_for("spm")
    texts = ["春天来了。", "夏天很热，", "秋天凉快。"] * 20
    blocks = encode_text_blocks(tokenizer, texts, block_size=16)
    assert blocks and all(len(b) == 16 for b in blocks)
    stream = [t for b in blocks for t in b]
    one = tokenizer.encode(texts[0]) + [tokenizer.eos_token_id]
    assert stream[: len(one)] == one
    assert stream.count(tokenizer.bos_token_id) >= len(blocks)
