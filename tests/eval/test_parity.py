"""`export gguf --verify`, and transformers as a second, independent reader of our GGUFs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from loraforge.eval.parity import (
    PROBES,
    TOKENIZER_PROBES,
    ParityFailed,
    compare_logits,
    format_parity,
    limits_for,
    verify_export,
)
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.schemes import SCHEMES
from loraforge.tiny import TinyShape, build_tiny_model

from conftest import random_adapter

EXTENDED_VOCAB = 2064  # a pre-training adapter that adds 64 tokens, as Chinese-LLaMA's does (at scale)


@pytest.fixture(scope="module")
def adapters(pretrained_llama, tmp_path_factory):
    """sft: the adapter verified; other: another one; pt: a pre-training adapter with an extended
    vocabulary (full embed_tokens/lm_head through modules_to_save), to chain before sft."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("parity")
    extended = AutoModelForCausalLM.from_pretrained(pretrained_llama, dtype=torch.float32)
    extended.resize_token_embeddings(EXTENDED_VOCAB, mean_resizing=False)
    extended.save_pretrained(root / "extended-base")
    return {"sft": random_adapter(pretrained_llama, root / "sft", 31, r=8, lora_alpha=16),
            "other": random_adapter(pretrained_llama, root / "other", 32, r=8, lora_alpha=16),
            "pt": random_adapter(root / "extended-base", root / "pt", 33, r=4, lora_alpha=8,
                                 modules_to_save=["embed_tokens", "lm_head"])}


def verified(base, adapter_list, tmp_path, quant):
    out = export_gguf(base, adapter_list, tmp_path / f"m-{quant}.gguf", quant)
    report = verify_export(out, base, adapter_list, tmp_path / f"m-{quant}.parity.json")
    assert json.loads((tmp_path / f"m-{quant}.parity.json").read_text(encoding="utf-8")) == report
    assert not list(tmp_path.glob(".*partial*"))
    return report


def test_f32_export_agrees_everywhere(pretrained_llama, adapters, tmp_path):
    report = verified(pretrained_llama, [adapters["sft"]], tmp_path, "f32")
    assert (report["verdict"], report["tier"], report["file_type_name"], report["problems"]) == ("PASS", "float", "F32", [])
    tokens = report["tokenization"]
    assert all(t["match"] for t in tokens) and [t["text"] for t in tokens[:len(PROBES)]] == PROBES
    assert [t["text"] for t in tokens[len(PROBES):-3]] == TOKENIZER_PROBES  # code, tables, after </s>
    # the base's chat template (LLaMA-Factory's 'default', from its pre-training run) renders every chat
    # prompt, compared too
    assert tokens[-3]["text"] == "Human: 请用一句话介绍一下长城。</s>\nAssistant:"
    assert [r["label"] for r in report["logits"]][-1] == "[chat] 把这句话翻译成英文：今天天气很好。"
    assert report["overall"]["top1"] == 1.0 and report["overall"]["kl_mean"] < 1e-6
    assert report["overall"]["max_abs_diff"] < 0.02
    assert all(g["identical"] and g["hf_ids"] == g["gguf_ids"] for g in report["generation"])


# quant → the tier it is judged in, and where its KL must fall on this model
@pytest.mark.parametrize("quant, tier, min_top1, kl_range", [
    ("f16", "float", 0.99, (0, 1e-5)),
    ("bf16", "float", 0.98, (1e-6, 1e-3)),
    ("q8_0", "8-bit", 0.90, (1e-5, 0.02)),  # a real, small divergence that still passes
    ("q4_k_m", "4-bit", 0.50, (1e-3, 0.5)),
])
def test_quantized_exports_report_their_divergence_and_pass(pretrained_llama, adapters, tmp_path, quant, tier,
                                                           min_top1, kl_range):
    report = verified(pretrained_llama, [adapters["sft"]], tmp_path, quant)
    overall = report["overall"]
    assert report["verdict"] == "PASS" and report["tier"] == tier
    assert overall["top1"] >= min_top1 and kl_range[0] < overall["kl_mean"] < kl_range[1], overall
    table = format_parity(report).splitlines()
    assert table[0] == f"{quant.upper()} ({tier}) under llama.cpp vs transformers fp32 + 1 adapter through peft"
    assert table[1].split() == ["prompt", "tokens", "top-1", "mean", "KL", "max", "|Δ|"]
    assert table[-3] == "tokenization: 20/20 strings identical"
    assert table[-1].startswith(f"PASS: {tier} file: ")


def test_a_chain_with_an_extended_vocabulary_passes(pretrained_llama, adapters, tmp_path):
    """pt (modules_to_save embed/lm_head with 64 new rows) merged in, sft live, as they were trained."""
    report = verified(pretrained_llama, [adapters["pt"], adapters["sft"]], tmp_path, "f32")
    assert report["verdict"] == "PASS" and report["overall"]["top1"] == 1.0
    assert report["overall"]["kl_mean"] < 1e-6


# the file exported and its type, the adapters it is verified against (by name), what the failure says
WRONG = {
    "another adapter": (["other"], "f16", ["sft"], r"top-1 agreement \d\.\d% .* < 99% expected for a float file"),  # under 10%
    "another adapter, 4-bit": (["other"], "q4_k_m", ["sft"], r"mean KL 1\.\d+ > 0\.5 expected for a 4-bit file"),
    "an adapter left out": ([], "f16", ["sft"], r"top-1 agreement .* < 99% expected for a float file"),
    "another vocabulary": (["pt", "sft"], "f16", ["sft"],
                           rf"the GGUF has {EXTENDED_VOCAB} tokens, base \+ adapters 2000"),
}


@pytest.mark.parametrize("case", WRONG)
def test_a_wrong_gguf_fails_after_writing_the_report(pretrained_llama, adapters, tmp_path, case):
    exported, quant, checked, reason = WRONG[case]
    out = export_gguf(pretrained_llama, [adapters[a] for a in exported], tmp_path / "m.gguf", quant)
    with pytest.raises(ParityFailed) as failure:
        verify_export(out, pretrained_llama, [adapters[a] for a in checked], tmp_path / "m.parity.json")
    report = json.loads((tmp_path / "m.parity.json").read_text(encoding="utf-8"))
    assert report == failure.value.report and report["verdict"] == "FAIL"
    assert re.search(reason, report["problems"][0])
    message = str(failure.value)
    assert message.startswith(f"{out} does not answer like base + adapters")
    assert re.search(reason, message) and message.endswith(f"full report: {tmp_path / 'm.parity.json'}")
    if "logits" in report:  # the user sees the table that shows it, ending with the verdict
        assert f"\nFAIL: {report['problems'][0]}" in message


def spm_base(pretrained_llama, tmp_path, tokenizer_json):
    """A copy of the base whose tokenizer.json is rewritten by `tokenizer_json(spec)` (None: removed)."""
    import shutil

    base = shutil.copytree(pretrained_llama, tmp_path / "base", ignore=shutil.ignore_patterns("checkpoint-*"))
    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    if tokenizer_json(spec) is None:
        (base / "tokenizer.json").unlink()
    else:
        (base / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return base


def transformers_rebuilt(spec):
    """What transformers 5's LlamaTokenizer builds from a bare tokenizer.model: Metaspace with
    prepend_scheme="first" and no normalizer — no "▁" before text that starts with a space."""
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return spec


def test_a_tokenizer_json_beside_tokenizer_model_does_not_decide_the_ids(pretrained_llama, adapters, tmp_path):
    """transformers 5's rebuilt pipeline in tokenizer.json, tokenizer.model beside it: training and --verify
    use sentencepiece (the model), as llama.cpp does, so the file passes."""
    base = spm_base(pretrained_llama, tmp_path, transformers_rebuilt)
    report = verified(base, [], tmp_path, "f32")
    assert report["verdict"] == "PASS" and all(t["match"] for t in report["tokenization"])


def test_a_tokenizer_json_that_cuts_text_unlike_llama_cpp_fails(pretrained_llama, tmp_path):
    base = spm_base(pretrained_llama, tmp_path, transformers_rebuilt)
    (base / "tokenizer.model").unlink()  # tokenizer.json alone: the ids training would use are its own
    out = export_gguf(base, [], tmp_path / "m.gguf", "f32")
    with pytest.raises(ParityFailed, match="llama.cpp cuts text unlike tokenizer.json") as failure:
        verify_export(out, base, [], tmp_path / "m.parity.json")
    report = failure.value.report
    assert re.fullmatch(r"\d+ of 20 strings tokenize differently \(first: '  leading spaces and' at token 3: "
                        r"gguf \['▁', 'l', 'e'\] vs transformers \['l', 'e', 'a'\]\)", report["problems"][0])
    differ = [t["text"] for t in report["tokenization"] if not t["match"]]
    assert differ[0] == "  leading spaces and trailing  " and all(t.startswith(" ") or "</s>" in t for t in differ)
    assert report["overall"]["top1"] == 1.0  # the weights are right: only the tokenizer is not


def test_a_base_with_only_tokenizer_model_is_verified_through_sentencepiece(pretrained_llama, adapters, tmp_path):
    """Chinese-LLaMA's releases ship tokenizer.model without tokenizer.json."""
    base = spm_base(pretrained_llama, tmp_path, lambda spec: None)
    report = verified(base, [adapters["sft"]], tmp_path, "f32")
    assert report["verdict"] == "PASS" and all(t["match"] for t in report["tokenization"])
    assert len(report["tokenization"]) == 20  # the chat template comes from chat_template.jinja


def test_kl_and_top1_of_known_distributions():
    reference = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    swapped = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
    stats = compare_logits(swapped, reference)
    assert stats["top1"] == 0.5 and stats["max_abs_diff"] == pytest.approx(np.log(0.7 / 0.2))
    expected = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)
    assert stats["kl_max"] == pytest.approx(expected) and stats["kl_mean"] == pytest.approx(expected / 2)


@pytest.mark.parametrize("name, scheme", SCHEMES.items())
def test_every_scheme_is_judged_by_its_bits(name, scheme):
    expected = ("float" if name in ("f32", "f16", "bf16") else "8-bit" if name.startswith("q8")
                else "5/6-bit" if name[:2] in ("q5", "q6") else "4-bit" if name.startswith(("q4", "iq4"))
                else "below 4-bit")
    assert limits_for(scheme.file_type).tier == expected


def test_verify_command_prints_the_table_and_writes_the_report(pretrained_llama, adapters, tmp_path):
    out = tmp_path / "cli.gguf"
    done = subprocess.run([sys.executable, "-m", "loraforge", "export", "gguf", "--base", str(pretrained_llama),
                           "--adapter", str(adapters["sft"]), "--quant", "f16", "--verify", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "F16 (float) under llama.cpp vs transformers fp32 + 1 adapter through peft"
    assert "tokenization: 20/20 strings identical" in lines
    assert lines[-2].startswith("PASS: float file: top-1 ≥ 99% where not a near-tie")
    assert lines[-1] == f"parity report: {tmp_path / 'cli.parity.json'}"
    assert json.loads((tmp_path / "cli.parity.json").read_text(encoding="utf-8"))["verdict"] == "PASS"


# -- transformers as an independent reader (gguf-py dequantization, its own name map and q/k un-permute)


@pytest.fixture(scope="module")
def wide_llama(spm_tokenizer, tmp_path_factory):
    """256-wide rows: the K-quant and IQ4_XS blocks are 256 values, narrower tensors fall back to Q8_0/Q5_0."""
    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("wide"), TinyShape(hidden=256, ffn=512))


@pytest.fixture(scope="module")
def qwen2_bpe(bpe_tokenizers, tmp_path_factory):
    return build_tiny_model(bpe_tokenizers["qwen2"], tmp_path_factory.mktemp("qwen2-bpe"), TinyShape(arch="qwen2"))


def models(request, which):
    """(base, adapters) of a read-back case."""
    if which in ("pretrained+sft", "pretrained+pt+sft"):
        chain = ["pt", "sft"] if "pt" in which else ["sft"]
        return request.getfixturevalue("pretrained_llama"), [request.getfixturevalue("adapters")[a] for a in chain]
    return request.getfixturevalue(which), []


@pytest.mark.parametrize("which, quant", [
    *[("pretrained+sft", q) for q in ("f32", "f16", "bf16", "q8_0", "q4_0")],
    ("pretrained+pt+sft", "f16"),  # an extended vocabulary: 2064 rows, tokens past the tokenizer's are padding
    *[("wide_llama", q) for q in ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq4_xs")],
    ("tiny_qwen2", "f32"), ("qwen2_bpe", "q8_0"),
])
def test_transformers_reads_our_gguf_weights_back(request, tmp_path, which, quant):
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from loraforge.eval.parity import reference_model

    base, adapter_list = models(request, which)
    out = export_gguf(base, adapter_list, tmp_path / f"m-{quant}.gguf", quant)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize("".join(PROBES).encode(), add_bos=True)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    llm.close()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
        trained = reference_model(base, adapter_list)(torch.tensor([ids])).logits[0].numpy()
    reader, quantization = compare_logits(theirs, ours), compare_logits(trained, ours)
    assert reader["top1_decisive"] >= 0.95, reader
    if which.startswith("pretrained") and quant in ("f32", "f16", "bf16", "q8_0"):
        assert reader["top1"] >= 0.95, reader  # a trained model, so few near-ties
    if quant not in ("f32", "f16", "bf16", "q8_0"):
        # transformers decodes the quantized weights llama.cpp runs (the rest is llama.cpp rounding
        # activations to 8 bits), not merely a model near the original
        assert reader["kl_mean"] * 5 < quantization["kl_mean"], (reader, quantization)


@pytest.mark.parametrize("which, spm", [("pretrained+sft", True), ("pretrained+pt+sft", True), ("tiny_qwen2", True),
                                        ("qwen2_bpe", False)])
def test_transformers_reads_our_gguf_tokenizer_back(request, tmp_path, which, spm):
    """Byte-level BPE round-trips. For SentencePiece, transformers' GGUF tokenizer (Metaspace
    prepend_scheme="first", no normalizer) drops one "▁" that sentencepiece, tokenizer.json and
    llama.cpp write: before text that starts with a space, and before text after a special token
    (so a template that writes "<s>" or "</s>" is cut differently)."""
    import llama_cpp
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base, adapter_list = models(request, which)
    out = export_gguf(base, adapter_list, tmp_path / "m.gguf", "q8_0")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, vocab_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    after_special = [f"{tokenizer.eos_token}hi", f"问{tokenizer.eos_token}答"]
    differ = {}
    for text in PROBES + after_special:
        ours, theirs = llm.tokenize(text.encode(), add_bos=True, special=True), tokenizer.encode(text)
        if ours != theirs:
            differ[text] = (ours, theirs)
    assert list(differ) == ([t for t in PROBES if t.startswith(" ")] + after_special if spm else [])
    for ours, theirs in differ.values():  # one lone "▁" less, nothing else
        assert any(tokenizer.convert_ids_to_tokens(ours[i]) == "▁" and ours[:i] + ours[i + 1:] == theirs
                   for i in range(len(ours)))
    assert tokenizer.chat_template == llm.metadata.get("tokenizer.chat_template")
    trained = PreTrainedTokenizerFast.from_pretrained(base)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (trained.bos_token, trained.eos_token)
