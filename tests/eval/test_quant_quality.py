"""`loraforge eval quant`: llama-perplexity's KL statistics, per quant type, on real llama.cpp."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loraforge.cli import main
from loraforge.eval.quant_quality import evaluate_quants, kl_statistics, recommend, summarize

from conftest import DATA_DIR

HELDOUT = DATA_DIR / "zh_heldout.txt"


def llama_cpp_percentile(values, fraction):
    """perplexity.cpp's `percentile` lambda, transcribed."""
    values = sorted(values)
    p = fraction * (len(values) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]


def test_kl_top1_and_percentiles_match_a_direct_computation():
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 3, (200, 50))
    logits = ref_logits + rng.normal(0, 0.5, ref_logits.shape)
    targets = rng.integers(0, 50, 200)
    ref_logprobs = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))

    got = summarize(**kl_statistics(ref_logprobs, logits, targets))

    kls, same, nll = [], [], []
    for p_logits, q_logits, t in zip(ref_logits, logits, targets):
        p = np.exp(p_logits) / np.exp(p_logits).sum()
        q = np.exp(q_logits) / np.exp(q_logits).sum()
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        same.append(int(np.argmax(p_logits) == np.argmax(q_logits)))
        nll.append(-math.log(q[t]))
    assert got["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-9)
    assert got["kl_p99"] == pytest.approx(llama_cpp_percentile(kls, 0.99), rel=1e-9)
    assert got["kl_max"] == pytest.approx(max(kls), rel=1e-9)
    assert got["top1"] == pytest.approx(np.mean(same))
    assert 0.5 < got["top1"] < 1.0  # the noise flips some argmaxes: the check is not vacuous
    assert got["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-9)
    assert got["scored_tokens"] == 200


def test_recommendation_is_the_smallest_file_within_the_budget():
    rows = [{"type": "q8_0", "file_bytes": 800, "kl_mean": 0.001}, {"type": "q4_k_m", "file_bytes": 450, "kl_mean": 0.03},
            {"type": "q2_k", "file_bytes": 300, "kl_mean": 0.4}]
    assert recommend(rows, 0.05)["type"] == "q4_k_m"
    assert recommend(rows, 1.0)["type"] == "q2_k"
    assert recommend(rows, 1e-4) is None


def test_eval_quant_measures_each_type_by_llama_perplexitys_rule(pretrained_llama, tmp_path):
    import llama_cpp

    from loraforge.eval.ppl import log_softmax

    ctx, chunks = 64, 3
    result = evaluate_quants(pretrained_llama, HELDOUT, ["q8_0", "q4_0"], out_dir=tmp_path / "eval",
                             keep=tmp_path / "kept", n_ctx=ctx, max_chunks=chunks, max_kl=10.0)
    report = result.report
    assert [r["type"] for r in report["rows"]] == ["q8_0", "q4_0"]
    assert report["scored_tokens"] == chunks * (ctx - 1 - ctx // 2)
    q8, q4 = report["rows"]
    assert 0 < q8["kl_mean"] < q4["kl_mean"] and q8["top1"] >= q4["top1"]
    assert q8["file_bytes"] > q4["file_bytes"] and 8.0 < q8["bpw"] < 9.0
    assert all(r["tokens_per_second"] > 0 and r["kl_p99"] >= r["kl_mean"] for r in report["rows"])
    assert report["recommendation"] == "q4_0" and "ship q4_0" in report["recommendation_text"]
    assert json.loads(result.json_path.read_text(encoding="utf-8"))["rows"][1]["type"] == "q4_0"
    assert "| q4_0 |" in result.md_path.read_text(encoding="utf-8")
    assert result.png_path.read_bytes()[:4] == b"\x89PNG"
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert kept == sorted([f"{pretrained_llama.name}-q4_0.gguf", f"{pretrained_llama.name}-q8_0.gguf",
                           "reference-f16.gguf"])

    # the same numbers, computed directly from llama.cpp's logits on the kept files
    def chunk_logits(path):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, logits_all=True, verbose=False, n_threads=2)
        ids = llm.tokenize(HELDOUT.read_text(encoding="utf-8").encode(), add_bos=True)
        out = []
        for i in range(chunks):
            chunk = [llm.token_bos()] + ids[i * ctx + 1:(i + 1) * ctx]
            llm.reset()
            llm.eval(chunk)
            out.append((np.array(llm.scores[ctx // 2:ctx - 1]), chunk[ctx // 2 + 1:]))
        llm.close()
        return out

    reference = chunk_logits(tmp_path / "kept" / "reference-f16.gguf")
    quant = chunk_logits(tmp_path / "kept" / f"{pretrained_llama.name}-q4_0.gguf")
    p = np.concatenate([log_softmax(r) for r, _ in reference])
    q = np.concatenate([log_softmax(x) for x, _ in quant])
    targets = np.concatenate([t for _, t in quant])
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert q4["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert q4["kl_p99"] == pytest.approx(llama_cpp_percentile(kl.tolist(), 0.99), rel=1e-4)
    assert q4["top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    assert q4["perplexity"] == pytest.approx(math.exp(-q[np.arange(len(targets)), targets].mean()), rel=1e-4)


@pytest.mark.parametrize("case, args, message", [
    ("no model", ["MISSING"], "no such model directory"),
    ("unknown type", ["--quants", "q4_k_m,q9_z"], "q9_z: not a llama.cpp quantization loraforge writes; choose from "
                                                  "f32, f16"),
    ("empty text", ["--text", "EMPTY"], "is empty"),
    ("short text", ["--text", "SHORT"], "shorter than one chunk"),
    ("no imatrix", ["--imatrix", "MISSING"], "no such file"),
])
def test_bad_input_exits_2_and_writes_nothing(case, args, message, tiny_llama, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "short.txt").write_text("春天", encoding="utf-8")
    model = str(tmp_path / "missing") if case == "no model" else str(tiny_llama)
    files = {"EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt", "MISSING": tmp_path / "missing"}
    extra = [] if case == "no model" else [str(files.get(a, a)) for a in args]
    command = ["eval", "quant", model, "--text", str(HELDOUT), "--quants", "q8_0", "--ctx", "64",
               "-o", str(tmp_path / "out"), "--keep", str(tmp_path / "kept"), *extra]
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "kept").exists()
