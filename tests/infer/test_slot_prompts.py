"""LLaMA-Factory's slot templates at inference: every engine feeds the model the ids training gave
the same prompt — on Meta's LLaMA-2 vocabulary and Chinese-LLaMA's, where a slot encoded alone
starts with a dummy `▁` that the one-text encoding of the same string lacks.

Truth: the training encoding (`encode_conversation`, itself equal to LLaMA-Factory's own rules in
tests/data/test_lf_templates.py): the engine's prompt ids must be the training ids up to the
first learned token of the last answer. llama.cpp's ids are compared with those too.
"""

from __future__ import annotations

import pytest

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import TEMPLATES, get_template, jinja_template
from loraforge.data.tokenize import IGNORE, encode_conversation
from loraforge.infer.engine import hf_prompt_ids, prompt_text, render_chat
from loraforge.tokenizer import encode_prompt, load_tokenizer

SLOT_TEMPLATES = sorted(name for name, t in TEMPLATES.items() if t.slots)
CONVERSATIONS = {
    "one turn": (None, [("user", "长城有多长？"), ("assistant", "两万多公里。")]),
    "system, two rounds": ("你是一个乐于助人的助手。", [("user", "你好"), ("assistant", "你好！有什么可以帮你？"),
                                                  ("user", "What is 2+2?"), ("assistant", "4")]),
}


def training_prompt(tokenizer, template, system, turns) -> list[int]:
    """The ids training gave everything before the last answer's first learned token."""
    conv = Conversation(tuple(Turn(r, t) for r, t in turns), system)
    enc = encode_conversation(tokenizer, template, conv, cutoff_len=10_000, mask_history=True)
    first_learned = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    return enc.input_ids[:first_learned]


def messages_of(system, turns) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": t} for r, t in turns]


@pytest.fixture(scope="module")
def tokenizers(real_tokenizers):
    return {name: load_tokenizer(real_tokenizers[name]) for name in ("llama2", "chinese-llama")}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", SLOT_TEMPLATES)
@pytest.mark.parametrize("vocab", ["llama2", "chinese-llama"])
def test_the_served_prompt_is_the_trained_prompt(tokenizers, vocab, name, conversation):
    tokenizer = tokenizers[vocab]
    template = get_template(name)
    system, turns = CONVERSATIONS[conversation]
    prompt = render_chat(jinja_template(template), messages_of(system, turns[:-1]), tokenizer.bos_token,
                         tokenizer.eos_token)
    assert hf_prompt_ids(tokenizer, prompt) == training_prompt(tokenizer, template, system, turns)


def test_the_one_text_encoding_differs_on_sentencepiece(tokenizers):
    """Why the slots travel as segments: the same prompt encoded as one text has other ids."""
    tokenizer = tokenizers["llama2"]
    template = get_template("qwen")
    system, turns = CONVERSATIONS["one turn"]
    prompt = render_chat(jinja_template(template), messages_of(system, turns[:-1]), "<s>", "</s>")
    assert isinstance(prompt, list) and len(prompt) > 1
    assert encode_prompt(tokenizer, prompt_text(prompt)) != training_prompt(tokenizer, template, system, turns)


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["llama2", "chinese-llama"])
def test_llama_cpp_feeds_the_trained_ids(real_tokenizer_models, tokenizers, vocab, tmp_path):
    """The GGUF engine (llama-cpp-python) and the server's own llama.cpp model give the training ids."""
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.infer.engine import open_engine
    from loraforge.serve.gguf_model import GgufModel
    from loraforge.serve.prompts import prompt_ids

    tokenizer = tokenizers[vocab]
    gguf = export_gguf(real_tokenizer_models[vocab], [], tmp_path / "m.gguf", "f32")
    engine, served = open_engine(str(gguf), n_ctx=512), GgufModel(gguf)
    try:
        for name in SLOT_TEMPLATES:
            template = get_template(name)
            for system, turns in CONVERSATIONS.values():
                want = training_prompt(tokenizer, template, system, turns)
                prompt = render_chat(jinja_template(template), messages_of(system, turns[:-1]), engine.bos_token,
                                     engine.eos_token)
                assert engine.tokenize(prompt) == want, (name, prompt)
                assert prompt_ids(served, prompt) == want, (name, prompt)
    finally:
        engine.close()
