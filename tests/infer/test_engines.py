"""Both engines on the learned run: transformers + peft on the adapter dir, llama.cpp on its F16 GGUF."""

from __future__ import annotations

import pytest

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import GenerationConfig

GREEDY = GenerationConfig(temperature=0, max_new_tokens=40)
HOT = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=24)  # every token possible
OPEN_PROMPT = "从前有一座山，"  # a raw prompt (no template) the model did not learn an answer for


@pytest.fixture(params=["hf", "llamacpp"])
def engine(request):
    return request.getfixturevalue({"hf": "hf_engine", "llamacpp": "gguf_engine"}[request.param])


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_greedy_text_is_identical_in_both_engines_and_is_what_was_trained(hf_engine, gguf_engine, learned_questions):
    for question, _ in learned_questions[:8]:
        assert hf_engine.render(ask(question)) == gguf_engine.render(ask(question))
        assert hf_engine.tokenize(hf_engine.render(ask(question))) == gguf_engine.tokenize(gguf_engine.render(ask(question)))
        hf, cpp = hf_engine.complete(ask(question), GREEDY), gguf_engine.complete(ask(question), GREEDY)
        assert hf.text == cpp.text, question
        assert hf.token_ids == cpp.token_ids and hf.finish_reason == cpp.finish_reason == "stop"
    learned = sum(hf_engine.complete(ask(q), GREEDY).text == a for q, a in learned_questions[:8])
    assert learned >= 6, learned


def test_stream_is_token_by_token_and_adds_up_to_the_completion(engine, learned_questions):
    question, answer = learned_questions[0]
    chunks = list(engine.stream(ask(question), GREEDY))
    assert sum(1 for c in chunks if c.text) >= 3  # Chinese characters arrive one token at a time
    assert "".join(c.text for c in chunks) == engine.complete(ask(question), GREEDY).text == answer
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1].token_id == 2  # EOS ends it and is not shown


def test_max_new_tokens_ends_with_length(engine, learned_questions):
    done = engine.complete(ask(learned_questions[0][0]), GenerationConfig(temperature=0, max_new_tokens=3))
    assert (len(done.token_ids), done.finish_reason) == (3, "length")
    assert learned_questions[0][1].startswith(done.text) and done.text


def test_stop_string_cuts_the_answer_before_it(engine, learned_questions):
    question, answer = learned_questions[0]
    stop = answer[4:6]
    done = engine.complete(ask(question), GenerationConfig(temperature=0, stop=(stop,)))
    assert (done.text, done.finish_reason) == (answer[:answer.index(stop)], "stop")


def test_the_same_seed_gives_the_same_text_and_another_seed_another(engine):
    runs = [engine.complete(OPEN_PROMPT, GenerationConfig(seed=seed, **HOT)).text for seed in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) == 3, runs


@pytest.mark.parametrize("constraint", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_the_best_token_gives_greedy_text_at_any_temperature(engine, constraint):
    greedy = engine.complete(OPEN_PROMPT, GenerationConfig(temperature=0, max_new_tokens=24)).text
    for seed in (1, 2):
        assert engine.complete(OPEN_PROMPT, GenerationConfig(seed=seed, **{**HOT, **constraint})).text == greedy


def test_typical_p_keeps_one_token_when_tiny(engine):
    texts = {engine.complete(OPEN_PROMPT, GenerationConfig(seed=seed, **HOT, typical_p=1e-6)).text for seed in (1, 2, 3)}
    assert len(texts) == 1


def test_lower_temperature_concentrates_the_choice(engine):
    def distinct(temperature):
        return len({engine.complete(OPEN_PROMPT, GenerationConfig(seed=s, **{**HOT, "temperature": temperature,
                                                                              "max_new_tokens": 6})).text
                    for s in range(6)})

    assert distinct(0.05) < distinct(1.5)


def repeated_share(ids: list[int]) -> float:
    """The share of tokens that repeat an earlier one (a share: an answer may end early)."""
    return (len(ids) - len(set(ids))) / len(ids)


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=3.0), dict(frequency_penalty=2.0),
                                     dict(presence_penalty=2.0)])
def test_penalties_reduce_repetition(engine, penalty):
    plain = engine.complete(OPEN_PROMPT, GenerationConfig(temperature=0, max_new_tokens=48))
    penalized = engine.complete(OPEN_PROMPT, GenerationConfig(temperature=0, max_new_tokens=48, **penalty))
    assert repeated_share(penalized.token_ids) < repeated_share(plain.token_ids), (plain.text, penalized.text)


def test_no_repeat_ngram_size_and_beams_in_transformers(hf_engine, gguf_engine, learned_questions):
    done = hf_engine.complete(OPEN_PROMPT, GenerationConfig(temperature=0, max_new_tokens=48, no_repeat_ngram_size=2))
    ids = hf_engine.tokenize(OPEN_PROMPT) + done.token_ids
    pairs = list(zip(ids, ids[1:]))
    assert len(pairs) == len(set(pairs)) and len(done.token_ids) > 10
    question, answer = learned_questions[1]
    beams = hf_engine.complete(ask(question), GenerationConfig(temperature=0, num_beams=3))
    assert (beams.text, beams.finish_reason) == (answer, "stop")
    with pytest.raises(LoraforgeError, match="transformers-only"):
        gguf_engine.complete(ask(question), GenerationConfig(num_beams=3))


def test_a_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(LoraforgeError, match=r"the prompt has \d+ tokens but the context window is"):
        engine.complete("长城" * engine.n_ctx, GREEDY)


def test_pieces_of_a_byte_fallback_character_are_held_back(engine):
    """The engine's own token bytes through the shared streaming path: an emoji the vocabulary
    only has as four byte tokens comes out whole, in one chunk."""
    ids = engine.tokenize("表情🙂")[1:]  # no BOS
    assert len(ids) >= 5
    from loraforge.infer.engine import ByteText, stream_tokens

    text = ByteText()
    out = [c.text for c in stream_tokens(iter(ids), lambda t: text(engine.token_bytes(t)), text.flush, set(), (), 100)]
    # (a leading space: SentencePiece's "▁" prefix on the first piece, shown in context)
    assert "".join(out).lstrip() == "表情🙂" and "🙂" in out and not any("\ufffd" in t for t in out)


@pytest.mark.parametrize("decoder", ["token bytes", "window decode"])
def test_an_answer_cut_inside_a_character_drops_its_first_bytes(engine, decoder):
    """max_new_tokens ending in the middle of a byte-fallback character: the answer ends before
    it, not in U+FFFD (issue 12: "…把二氧化�"). Both of the HF engine's decoders (its own token
    bytes, and the window decode it falls back to for a tokenizer it cannot map to bytes)."""
    from loraforge.infer.engine import ByteText, stream_tokens
    from loraforge.infer.hf import _TextDelta

    if decoder == "window decode" and not hasattr(engine, "tokenizer"):
        pytest.skip("llama.cpp writes every token's bytes")
    ids = engine.tokenize("表情🙂")[1:]
    emoji_start = len(engine.tokenize("表情")) - 1
    cuts = []
    for k in range(1, len(ids) + 1):
        if decoder == "token bytes":
            text = ByteText()
            to_text, flush = (lambda t, text=text: text(engine.token_bytes(t))), text.flush
        else:
            to_text = _TextDelta(engine.tokenizer, [])
            flush = to_text.flush
        chunks = list(stream_tokens(iter(ids), to_text, flush, set(), (), k))
        assert chunks[-1].finish_reason == "length" and len(chunks) == k
        cuts.append("".join(c.text for c in chunks).lstrip())
    assert not any("\ufffd" in cut for cut in cuts), cuts
    assert all(cut == "表情" for cut in cuts[emoji_start:-1]), cuts  # the emoji's first bytes are held, then dropped
    assert cuts[-1] == "表情🙂"


def test_template_override_and_engine_mismatch(learned_run_dir, learned_gguf_f16):
    from loraforge.infer.engine import open_engine

    with pytest.raises(LoraforgeError, match="llama.cpp needs a .gguf — export it first"):
        open_engine(learned_run_dir, engine="llamacpp")
    with pytest.raises(LoraforgeError, match="is a GGUF file: the transformers engine needs"):
        open_engine(learned_gguf_f16, engine="hf")
    with pytest.raises(LoraforgeError, match="unknown chat template 'chatm'"):
        open_engine(learned_gguf_f16, template="chatm")
    engine = open_engine(learned_gguf_f16, template="chatml-joined", n_ctx=256)
    try:
        assert engine.render(ask("你好")).startswith("<|im_start|>system\n")
        assert engine.n_ctx == 256
    finally:
        engine.close()


def test_a_prompt_tuning_adapter_runs_live_through_peft(pretrained_llama, tmp_path):
    """Virtual tokens cannot be merged: the engine keeps the adapter live and decodes with generate()."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.infer.engine import open_engine

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(pretrained_llama)
    get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).save_pretrained(
        tmp_path / "pt")
    tuned, base = open_engine(tmp_path / "pt", engine="hf"), open_engine(pretrained_llama, engine="hf")
    greedy = GenerationConfig(temperature=0, max_new_tokens=8)
    with_prompt = tuned.complete(OPEN_PROMPT, greedy)
    assert (len(with_prompt.token_ids), with_prompt.finish_reason) == (8, "length")
    assert with_prompt.token_ids != base.complete(OPEN_PROMPT, greedy).token_ids  # the virtual tokens count
    sampled = [tuned.complete(OPEN_PROMPT, GenerationConfig(seed=5, **HOT)).text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_adapters_on_top_the_same_in_both_engines(pretrained_llama, tmp_path):
    """--adapter: a peft dir live on the HF base, and the same adapter as a llama.cpp adapter GGUF."""
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.export.lora_gguf import export_lora_gguf
    from loraforge.infer.engine import open_engine

    from conftest import random_adapter

    adapter = random_adapter(pretrained_llama, tmp_path / "lora", 4, r=8, lora_alpha=16)
    base_gguf = export_gguf(pretrained_llama, [], tmp_path / "base-f32.gguf", "f32")
    adapter_gguf = export_lora_gguf(adapter, tmp_path / "lora.gguf", pretrained_llama)
    greedy = GenerationConfig(temperature=0, max_new_tokens=16)
    hf = open_engine(pretrained_llama, engine="hf", adapters=[adapter])
    cpp = open_engine(base_gguf, adapters=[adapter_gguf], n_ctx=128)
    plain = open_engine(base_gguf, n_ctx=128)
    try:
        with_adapter = cpp.complete(OPEN_PROMPT, greedy)
        assert hf.complete(OPEN_PROMPT, greedy).token_ids == with_adapter.token_ids
        assert plain.complete(OPEN_PROMPT, greedy).token_ids != with_adapter.token_ids
        with pytest.raises(LoraforgeError, match="one LoRA adapter .gguf"):
            open_engine(base_gguf, adapters=[adapter_gguf, adapter_gguf])
    finally:
        for engine in (hf, cpp, plain):
            engine.close()
