"""LLaMA-Factory's templates as LLaMA-Factory encodes them: ids and labels equal to its own.

Ground truth is LLaMA-Factory's rules, read from its source (src/llamafactory/data/
template.py `register_template` calls and `Template._encode` / `_convert_elements_to_ids`,
`Llama2Template`, `ReasoningTemplate.encode_multiturn`; processor/supervised.py
`_encode_data_example`; commit ff6d4d1 of hiyouga/LLaMA-Factory). `LF_SLOTS` below writes its
slot definitions out as it does — strings with `{{content}}`, `{"bos_token"}` / `{"eos_token"}`
sets — and `lf_encode` follows its rules on them: a separate code path from
loraforge's format strings and renderer, on the same tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from loraforge.data.formats import load_records
from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import (
    TEMPLATES,
    get_template,
    jinja_template,
    prompt_segments,
    render_prompt,
    template_name_in,
    to_messages,
)
from loraforge.data.tokenize import IGNORE, encode_conversation, encode_prompt_turns
from loraforge.tokenizer import encode_prompt

# Meta's LLaMA-2 tokenizer.model, where tests/conftest.py's real_tokenizers finds it
REAL_TOKENIZERS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "tokenizers"
BOS, EOS = frozenset({"bos_token"}), frozenset({"eos_token"})
_CHATML = {
    "user": ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
    "assistant": ["{{content}}<|im_end|>\n"],
    "system": ["<|im_start|>system\n{{content}}<|im_end|>\n"],
}
_LLAMA2 = {"user": [BOS, "[INST] {{content}} [/INST]"], "system": ["<<SYS>>\n{{content}}\n<</SYS>>\n\n"],
           "fuse_system": True}
# LLaMA-Factory's register_template arguments; what a template leaves out takes its defaults:
# user and system ["{{content}}"], assistant ["{{content}}", eos], no prefix, default_system "".
LF_SLOTS = {
    "alpaca": {
        "user": ["### Instruction:\n{{content}}\n\n### Response:\n"],
        "assistant": ["{{content}}", EOS, "\n\n"],
        "default_system": "Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n",
    },
    "default": {
        "user": ["Human: {{content}}", EOS, "\nAssistant:"],
        "assistant": ["{{content}}", EOS, "\n"],
        "system": ["System: {{content}}", EOS, "\n"],
    },
    "empty": {"assistant": ["{{content}}"]},
    "llama2": _LLAMA2,
    "llama2_zh": {**_LLAMA2, "default_system": "You are a helpful assistant. 你是一个乐于助人的助手。"},
    "llama3": {
        "user": ["<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"],
        "assistant": ["{{content}}<|eot_id|>"],
        "system": ["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
        "prefix": [BOS],
    },
    "mistral": {
        "user": ["[INST] {{content}}[/INST]"],
        "assistant": [" {{content}}", EOS],
        "system": ["{{content}}\n\n"],
        "prefix": [BOS],
        "fuse_system": True,
    },
    "chatml": _CHATML,
    "qwen": {**_CHATML, "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
    "qwen3": {**_CHATML, "reasoning": True},
    "qwen3_nothink": _CHATML,
}
THOUGHT = ("<think>\n", "\n</think>\n\n")  # register_template's default thought_words


def lf_encode(tokenizer, name: str, messages: list[tuple[str, str]], system: str, enable_thinking: bool = True,
              cutoff_len: int = 100_000, train_on_prompt: bool = False, mask_history: bool = False
              ) -> tuple[list[int], list[int], list[list[int]]]:
    """(input_ids, labels, per-message ids) as LLaMA-Factory's SFT preprocessing makes them."""
    spec = LF_SLOTS[name]
    user, system_slots = spec.get("user", ["{{content}}"]), spec.get("system", ["{{content}}"])
    assistant, prefix = spec.get("assistant", ["{{content}}", EOS]), spec.get("prefix", [])
    system = system or spec.get("default_system", "")  # its `system or self.default_system`

    def apply(slots, content):
        return [s.replace("{{content}}", content, 1) if isinstance(s, str) else s for s in slots]

    def ids(elements):
        out = []
        for element in elements:
            if isinstance(element, str):
                out += tokenizer.encode(element, add_special_tokens=False) if element else []
            elif "bos_token" in element and tokenizer.bos_token_id is not None:
                out.append(tokenizer.bos_token_id)
            elif "eos_token" in element and tokenizer.eos_token_id is not None:
                out.append(tokenizer.eos_token_id)
        return out

    if spec.get("reasoning") and not enable_thinking:
        messages = [(role, _remove_thought(text) if role == "assistant" else text) for role, text in messages]
    encoded = []
    for i, (role, content) in enumerate(messages):
        elements = list(prefix) if i == 0 else []
        if spec.get("fuse_system"):  # Llama2Template: the system slot's text opens the first user content
            system_text = apply(system_slots, system)[0] if i == 0 and system else ""
            elements += apply(user, system_text + content) if role == "user" else apply(assistant, content)
        else:
            if i == 0 and system:
                elements += apply(system_slots, system)
            elements += apply(user if role == "user" else assistant, content)
        encoded.append(ids(elements))
    if spec.get("reasoning"):  # an answer without a thought gets an empty one
        for i in range(0, len(messages), 2):
            answer = messages[i + 1][1]
            if THOUGHT[0].strip() not in answer and THOUGHT[1].strip() not in answer:
                empty = ids([THOUGHT[0] + THOUGHT[1]])
                if enable_thinking:
                    encoded[i + 1] = empty + encoded[i + 1]
                else:
                    encoded[i] = encoded[i] + empty
    input_ids, labels = lf_supervised(list(zip(encoded[0::2], encoded[1::2])), cutoff_len, train_on_prompt,
                                      mask_history)
    return input_ids, labels, encoded


def lf_supervised(pairs, cutoff_len, train_on_prompt, mask_history):
    """processor/supervised.py `_encode_data_example` (no efficient_eos template here) with
    processor_utils.py `infer_seqlen`."""
    def infer_seqlen(source_len, target_len, cutoff):
        if target_len * 2 < cutoff:
            max_target_len = cutoff
        elif source_len * 2 < cutoff:
            max_target_len = cutoff - source_len
        else:
            max_target_len = int(cutoff * (target_len / (source_len + target_len)))
        new_target_len = min(max_target_len, target_len)
        return min(max(cutoff - new_target_len, 0), source_len), new_target_len

    input_ids, labels, total = [], [], 0
    if mask_history:
        pairs = pairs[::-1]
    for turn_idx, (source_ids, target_ids) in enumerate(pairs):
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total)
        source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
        total += source_len + target_len
        source_label = source_ids if train_on_prompt else [IGNORE] * source_len
        target_label = [IGNORE] * target_len if mask_history and turn_idx != 0 else target_ids
        if mask_history:
            input_ids, labels = source_ids + target_ids + input_ids, source_label + target_label + labels
        else:
            input_ids, labels = input_ids + source_ids + target_ids, labels + source_label + target_label
    return input_ids, labels


def _remove_thought(text: str) -> str:
    pattern = re.compile(f"{re.escape(THOUGHT[0])}(.*?){re.escape(THOUGHT[1])}", re.DOTALL)
    return re.sub(pattern, "", text).lstrip("\n")


# (messages, system as LLaMA-Factory's data gives it; "" is no system column / an empty one)
CONVERSATIONS = {
    "single": ([("user", "What is 2+2?"), ("assistant", "4")], ""),
    "system": ([("user", "Hi"), ("assistant", "Hello!")], "Be brief."),
    "multi": ([("user", "Name a colour."), ("assistant", "Red."), ("user", "Another?"), ("assistant", "Blue."),
               ("user", "And one more?"), ("assistant", "Green.")], "Be brief."),
    "chinese": ([("user", "请用一句话介绍北京：它是什么？"), ("assistant", "北京是中国的首都，有三千多年历史。"),
                 ("user", "  它有多少人口？ "), ("assistant", "大约两千一百万人。\n")], "你是一个助手（简洁）。"),
    "thought": ([("user", "1+1=?"), ("assistant", "<think>\n一加一。\n</think>\n\n2")], ""),
}


def ours(messages, system: str) -> Conversation:
    """The same record as loraforge's loaders make it: an empty system field is no system
    prompt given (None → the template's default), as LLaMA-Factory's `system or default`."""
    return Conversation(tuple(Turn(role, text) for role, text in messages), system or None)


@pytest.fixture(scope="module")
def tokenizers(spm_tokenizer, bpe_tokenizers, tmp_path_factory):
    """Meta's LLaMA-2 tokenizer (as `real_tokenizers["llama2"]` builds it, without the
    fixture's other, slower vocabularies), the same with ChatML's markers added the way
    LLaMA-Factory's fix_special_tokens adds a template's stop words, the tiny SentencePiece
    one, and the byte-level BPE ones."""
    from loraforge.vocab.spm import save_hf_tokenizer

    folder = tmp_path_factory.mktemp("lf-llama2")
    save_hf_tokenizer(REAL_TOKENIZERS / "llama2.model", folder)
    chatml = AutoTokenizer.from_pretrained(folder)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|im_start|>"]})
    return {
        "llama2": AutoTokenizer.from_pretrained(folder),
        "llama2+chatml": chatml,
        "tiny-spm": AutoTokenizer.from_pretrained(spm_tokenizer),
        "bpe-llama3": AutoTokenizer.from_pretrained(bpe_tokenizers["llama3"]),
        "bpe-qwen2": AutoTokenizer.from_pretrained(bpe_tokenizers["qwen2"]),
    }


SPM_TEMPLATES = ("alpaca", "default", "empty", "llama2", "llama2_zh", "mistral")
CHATML_TEMPLATES = ("chatml", "qwen", "qwen3", "qwen3_nothink")
CASES = [(name, kind) for name in SPM_TEMPLATES for kind in ("llama2", "tiny-spm")]
CASES += [(name, "bpe-llama3") for name in ("alpaca", "default", "empty", "llama3")]
CASES += [(name, kind) for name in CHATML_TEMPLATES for kind in ("bpe-qwen2", "llama2+chatml")]


def test_every_llama_factory_name_is_in_the_table():
    assert {name for name in TEMPLATES if TEMPLATES[name].slots} == set(LF_SLOTS)
    assert {name for name, _ in CASES} == set(LF_SLOTS)


@pytest.mark.parametrize("conv_id", CONVERSATIONS)
@pytest.mark.parametrize("name, kind", CASES)
def test_ids_and_labels_equal_llama_factorys(tokenizers, name, kind, conv_id):
    tokenizer = tokenizers[kind]
    messages, system = CONVERSATIONS[conv_id]
    want_ids, want_labels, _ = lf_encode(tokenizer, name, messages, system)
    enc = encode_conversation(tokenizer, get_template(name), ours(messages, system), cutoff_len=100_000)
    assert enc.input_ids == want_ids, tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert enc.labels == want_labels


@pytest.mark.parametrize("name", ["qwen3"])
def test_thinking_off_moves_the_empty_thought_into_the_prompt(tokenizers, name):
    from dataclasses import replace

    tokenizer = tokenizers["bpe-qwen2"]
    for conv_id in ("multi", "thought"):
        messages, system = CONVERSATIONS[conv_id]
        want_ids, want_labels, _ = lf_encode(tokenizer, name, messages, system, enable_thinking=False)
        off = replace(get_template(name), enable_thinking=False)
        enc = encode_conversation(tokenizer, off, ours(messages, system), cutoff_len=100_000)
        assert (enc.input_ids, enc.labels) == (want_ids, want_labels)
        _, _, encoded = lf_encode(tokenizer, name, messages[:2], system, enable_thinking=False)
        prompt = encode_prompt_turns(tokenizer, off, system or None, list(ours(messages[:1], system).turns))
        assert prompt == encoded[0]  # the generation prompt ends with the empty thought


@pytest.mark.parametrize("name, kind", CASES)
def test_generation_prompt_ids_equal_llama_factorys(tokenizers, name, kind):
    """What LLaMA-Factory's chat engine feeds the model (`encode_oneturn`: every message
    but the answer) is what `encode_prompt_turns` gives, at every round."""
    tokenizer = tokenizers[kind]
    messages, system = CONVERSATIONS["multi"]
    for end in range(1, len(messages), 2):
        _, _, encoded = lf_encode(tokenizer, name, messages[: end + 1], system)
        want = [i for ids in encoded[:-1] for i in ids]
        turns = list(ours(messages[:end], system).turns)
        assert encode_prompt_turns(tokenizer, get_template(name), system or None, turns) == want, end


@pytest.mark.parametrize("name, kind", [(n, k) for n, k in CASES if k.startswith("bpe")])
def test_byte_level_vocabularies_see_the_same_ids_from_the_rendered_prompt(tokenizers, name, kind):
    """On byte-level BPE no slot gets a dummy prefix, so encoding the rendered prompt string —
    what llama.cpp and our engines do with the GGUF's template — gives LLaMA-Factory's ids,
    BOS included exactly where its template writes one."""
    tokenizer = tokenizers[kind]
    messages, system = CONVERSATIONS["chinese"]
    _, _, encoded = lf_encode(tokenizer, name, messages, system)
    text = render_prompt(get_template(name), system or None, list(ours(messages[:3], system).turns),
                         tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "")
    ids = encode_prompt(tokenizer, text)
    lf = [i for part in encoded[:-1] for i in part]
    if tokenizer.bos_token and not LF_SLOTS[name].get("prefix"):
        # a template without BOS on a vocabulary that adds one: the only difference
        assert ids == [tokenizer.bos_token_id] + lf
    else:
        assert ids == lf


_SYSTEM_PIECES = ["▁Below", "▁is", "▁an", "▁instruction", "▁that", "▁describes", "▁a", "▁task", ".", "▁Write",
                  "▁a", "▁response", "▁that", "▁appropri", "ately", "▁comple", "tes", "▁the", "▁request", ".",
                  "<0x0A>", "<0x0A>"]


def test_the_issues_alpaca_example(tokenizers):
    """Issue 15's measurement, on Meta's tokenizer, written out by hand from LLaMA-Factory's
    slots ("…request.\n\n" | "### Instruction:\nHi\n\n### Response:\n" | "Hello!" | </s> |
    "\n\n", each encoded alone): no BOS, `▁###` after the system prompt, `▁Hello`, and a
    learned `▁\n\n` after EOS. loraforge's one-text encoding (alpaca-joined) has BOS, `##`+`#`,
    `Hello`, and stops at EOS — what llama.cpp makes of the same rendered string."""
    tokenizer = tokenizers["llama2"]
    conv = ours([("user", "Hi"), ("assistant", "Hello!")], "")
    prompt = ["<0x0A>", "Hi", "<0x0A>", "<0x0A>", "##", "#", "▁Response", ":", "<0x0A>"]
    lf = encode_conversation(tokenizer, get_template("alpaca"), conv, cutoff_len=4096)
    assert tokenizer.convert_ids_to_tokens(lf.input_ids) == [
        *_SYSTEM_PIECES, "▁###", "▁Inst", "ruction", ":", *prompt, "▁Hello", "!", "</s>", "▁", "<0x0A>", "<0x0A>"]
    assert tokenizer.convert_ids_to_tokens([i for i in lf.labels if i != IGNORE]) == [
        "▁Hello", "!", "</s>", "▁", "<0x0A>", "<0x0A>"]
    joined = encode_conversation(tokenizer, get_template("alpaca-joined"), conv, cutoff_len=4096)
    assert tokenizer.convert_ids_to_tokens(joined.input_ids) == [
        "<s>", *_SYSTEM_PIECES, "##", "#", "▁Inst", "ruction", ":", *prompt, "Hello", "!", "</s>"]


def test_an_empty_system_field_in_data_means_the_default_as_in_llama_factory(tokenizers, tmp_path):
    """LLaMA-Factory's `system or default_system`: a record whose system field is "" gets the
    default system prompt. loraforge's loader gives such a record no system (None), which our
    templates read the same way — while `Conversation(system="")` (the API's explicit empty
    system message) still means none."""
    rows = [{"instruction": "Hi", "input": "", "output": "Hello!", "system": ""}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    (record,) = load_records(path).records
    tokenizer = tokenizers["llama2"]
    want_ids, want_labels, _ = lf_encode(tokenizer, "alpaca", [("user", "Hi"), ("assistant", "Hello!")], "")
    enc = encode_conversation(tokenizer, get_template("alpaca"), record, cutoff_len=4096)
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)
    explicit = Conversation(record.turns, system="")
    assert "▁Below" not in tokenizer.convert_ids_to_tokens(
        encode_conversation(tokenizer, get_template("alpaca"), explicit, cutoff_len=4096).input_ids)


SAVED = json.loads((Path(__file__).parent / "saved_chat_templates.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", [n for n in SAVED if not n.startswith("_")])
def test_runs_saved_with_the_old_meaning_of_a_name_keep_it(name):
    """A run trained as 'alpaca' before carries that Jinja in its tokenizer (and GGUF): it is
    served with what it learned — 'alpaca-joined' now — not with LLaMA-Factory's alpaca."""
    saved = SAVED[name]
    want = f"{name}-joined" if f"{name}-joined" in TEMPLATES else name
    assert template_name_in(saved) == want
    compiled = jinja2.Environment().from_string(saved)
    messages, system = CONVERSATIONS["chinese"]
    conv = ours(messages[:3], system)
    got = compiled.render(messages=to_messages(conv), add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert got == render_prompt(get_template(want), conv.system, list(conv.turns), "</s>", bos_token="<s>")
    assert template_name_in(jinja_template(get_template(name))) == name  # today's template keeps its name


@pytest.fixture(scope="module")
def llama2_gguf_vocab(tokenizers, tmp_path_factory):
    """llama.cpp's own tokenizer for Meta's vocabulary: a 1-layer model on it, exported, vocab only."""
    import llama_cpp

    from loraforge.export.gguf_writer import export_gguf
    from loraforge.tiny import TinyShape, build_tiny_model

    root = tmp_path_factory.mktemp("lf-gguf")
    model = build_tiny_model(Path(tokenizers["llama2"].name_or_path), root / "model",
                             TinyShape(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64))
    path = export_gguf(model, [], root / "model.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("name", SPM_TEMPLATES)
def test_llama_cpp_reaches_llama_factorys_prompt_ids_only_slot_by_slot(tokenizers, llama2_gguf_vocab, name):
    """At inference llama.cpp tokenizes the rendered prompt as one string: on a SentencePiece
    vocabulary that is not what LLaMA-Factory trained on (BOS where it wrote none, no `▁`
    opening a slot: `##`+`#` for `▁###`, `Red` for `▁Red` …). Tokenizing `prompt_segments`
    one by one with llama.cpp gives its ids exactly."""
    llm, tokenizer = llama2_gguf_vocab, tokenizers["llama2"]
    t = get_template(name)
    messages, system = CONVERSATIONS["multi"]
    _, _, encoded = lf_encode(tokenizer, name, messages, system)
    lf = [i for part in encoded[:-1] for i in part]
    turns = list(ours(messages[:-1], system).turns)
    segments = prompt_segments(t, system or None, turns, "</s>", bos_token="<s>")
    slot_by_slot = [i for text, _ in segments for i in llm.tokenize(text.encode(), add_bos=False, special=True)]
    assert slot_by_slot == lf
    text = render_prompt(t, system or None, turns, "</s>", bos_token="<s>")
    one_string = llm.tokenize(text.encode(), add_bos=not text.startswith("<s>"), special=True)
    assert one_string == encode_prompt(tokenizer, text)  # llama.cpp and transformers agree on the string
    assert one_string != lf  # ... and both differ from what LLaMA-Factory trained on (every SPM template here)


@pytest.mark.parametrize("given, hint", [
    ("llama2", None),  # the issue's wrong hint (→ llama3): it is a template now
    ("Qwen2.5", "did you mean 'qwen' (the template of that model family)"),
    ("llama3.1", "did you mean 'llama3' (the template of that model family)"),
    ("QWEN-3", "did you mean 'qwen3'?"),
    ("chatlm", "did you mean 'chatml'?"),
    ("Llama2_ZH", "did you mean 'llama2_zh' ("),  # both: loraforge's llama2-zh and LLaMA-Factory's llama2_zh
    ("gemma", "unknown chat template 'gemma': known templates"),  # no far-fetched guess
])
def test_template_name_hints(given, hint):
    from loraforge.errors import LoraforgeError

    if hint is None:
        assert get_template(given).name == given
        return
    with pytest.raises(LoraforgeError, match="known templates are") as err:
        get_template(given)
    assert hint in str(err.value)
    if given == "Llama2_ZH":
        assert "or 'llama2-zh' (" in str(err.value)


@pytest.mark.parametrize("cutoff_len", [8, 21, 40, 64])
@pytest.mark.parametrize("options", [{}, {"train_on_prompt": True}, {"mask_history": True},
                                     {"train_on_prompt": True, "mask_history": True}], ids=str)
@pytest.mark.parametrize("name, kind", [("alpaca", "llama2"), ("llama2", "tiny-spm"), ("qwen", "bpe-qwen2")])
def test_cutoff_and_label_options_equal_llama_factorys(tokenizers, name, kind, options, cutoff_len):
    """A conversation longer than cutoff_len is cut as LLaMA-Factory cuts it: each round's
    prompt and answer by its infer_seqlen share (the last round first under mask_history),
    not by dropping the end."""
    tokenizer = tokenizers[kind]
    messages, system = CONVERSATIONS["chinese"]
    want_ids, want_labels, _ = lf_encode(tokenizer, name, messages, system, cutoff_len=cutoff_len, **options)
    enc = encode_conversation(tokenizer, get_template(name), ours(messages, system), cutoff_len=cutoff_len, **options)
    if all(label == IGNORE for label in want_labels):
        assert enc is None
    else:
        assert (enc.input_ids, enc.labels) == (want_ids, want_labels)
        assert enc.full_length > len(enc.input_ids)
