"""`export gguf --verify`, and transformers as a second, independent reader of our GGUFs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.eval.parity import compare_logits, format_parity, verify_export
from loraforge.export.gguf_writer import export_gguf

from conftest import random_adapter


@pytest.fixture(scope="module")
def adapter(pretrained_llama, tmp_path_factory):
    return random_adapter(pretrained_llama, tmp_path_factory.mktemp("parity") / "sft", 31, r=8, lora_alpha=16)


def test_f32_export_agrees_everywhere(pretrained_llama, adapter, tmp_path):
    out = export_gguf(pretrained_llama, [adapter], tmp_path / "m.gguf", "f32")
    report = verify_export(out, pretrained_llama, [adapter], tmp_path / "m.parity.json")
    assert report["verdict"] == "PASS" and report["kind"] == "float"
    assert all(t["match"] for t in report["tokenization"]) and len(report["tokenization"]) >= 9
    assert report["overall"]["top1"] == 1.0 and report["overall"]["kl_mean"] < 1e-6
    assert all(g["identical"] for g in report["generation"])
    assert json.loads((tmp_path / "m.parity.json").read_text())["overall"] == report["overall"]


def test_q8_0_reports_a_small_but_real_divergence(pretrained_llama, adapter, tmp_path):
    out = export_gguf(pretrained_llama, [adapter], tmp_path / "m.gguf", "q8_0")
    report = verify_export(out, pretrained_llama, [adapter], tmp_path / "m.parity.json")
    assert report["verdict"] == "PASS" and report["file_type"] == 7
    assert 0 < report["overall"]["kl_mean"] < 0.05 and report["overall"]["top1"] >= 0.9
    table = format_parity(report)
    assert table.splitlines()[0].split() == ["prompt", "tokens", "top-1", "mean", "KL", "max", "|Δ|"]
    assert table.splitlines()[-1].startswith("PASS: q8_0 file: top-1 ≥ 90% (where not a near-tie: ")
    assert table.endswith("mean KL ≤ 0.05")


def test_a_file_from_another_adapter_fails_and_the_report_says_why(pretrained_llama, adapter, tmp_path):
    other = random_adapter(pretrained_llama, tmp_path / "other", 32, r=8, lora_alpha=16)
    out = export_gguf(pretrained_llama, [other], tmp_path / "m.gguf", "f16")
    with pytest.raises(LoraforgeError, match=r"does not answer like base \+ adapters: top-1 agreement .* < 99% "
                                             r"expected for a float file.*details in .*m.parity.json"):
        verify_export(out, pretrained_llama, [adapter], tmp_path / "m.parity.json")
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert report["verdict"] == "FAIL" and report["problems"]


def test_kl_and_top1_of_known_distributions():
    reference = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    swapped = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
    stats = compare_logits(swapped, reference)
    assert stats["top1"] == 0.5
    expected = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)
    assert stats["kl_max"] == pytest.approx(expected) and stats["kl_mean"] == pytest.approx(expected / 2)


def test_verify_command_on_a_trained_run(learned_run, tmp_path):
    config, result = learned_run
    out = tmp_path / "run.gguf"
    done = subprocess.run([sys.executable, "-m", "loraforge", "export", "gguf", "--base", str(config.model.path),
                           "--adapter", str(result.output_dir), "--quant", "f16", "--verify", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "PASS: float file" in done.stdout and "tokenization: 10/10 strings identical" in done.stdout
    report = json.loads((tmp_path / "run.parity.json").read_text())
    # the run's template (chinese-alpaca) renders the prompts, markup included
    assert "### Instruction:\n请用一句话介绍一下长城。\n\n### Response:" in report["tokenization"][-1]["text"]
    assert all(g["identical"] for g in report["generation"])
    assert report["overall"]["top1_decisive"] == 1.0 and report["overall"]["top1"] >= 0.97


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_transformers_reads_our_gguf_back(pretrained_llama, adapter, tmp_path, quant):
    """An independent reader: transformers' GGUF loader (gguf-py dequantization) gets the same model."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(pretrained_llama, [adapter], tmp_path / f"m-{quant}.gguf", quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    text = "春天来了，公园里的花都开了。Hello world 2024"
    ids = llm.tokenize(text.encode(), add_bos=True)
    assert tokenizer.encode(text) == ids
    llm.eval(ids)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(llm.scores[: len(ids)])
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


def test_transformers_reads_our_qwen2_gguf_back(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_gguf(tiny_qwen2, [], tmp_path / "q.gguf", "f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 300, 999, 7, 1500]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
