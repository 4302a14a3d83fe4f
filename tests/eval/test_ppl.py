"""`eval ppl`: the strided-window rule against transformers' own loss, HF against GGUF, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.eval.ppl import GGUFScorer, open_scorer, perplexity, token_logprobs, windows
from loraforge.export.gguf_writer import export_gguf

from conftest import CORPUS


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 700 tokens of the bundled Chinese text (with its newlines)."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("ppl") / "held_out.txt"
    path.write_text("\n".join(lines[-12:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained_f32(pretrained_llama, tmp_path_factory):
    return export_gguf(pretrained_llama, [], tmp_path_factory.mktemp("ppl-gguf") / "pretrained-f32.gguf", "f32")


@pytest.fixture(scope="module")
def learned_f16(learned_run, tmp_path_factory):
    config, result = learned_run
    return export_gguf(config.model.path, [result.output_dir], tmp_path_factory.mktemp("ppl-gguf") / "learned-f16.gguf",
                       "f16")


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 2), (100, 32, 16), (100, 32, 31), (101, 32, 7),
                                             (50, 64, 32), (64, 64, 32), (65, 64, 32)])
def test_every_token_but_the_first_is_scored_once_with_enough_context(n, window, stride):
    scored = []
    for i, (begin, end, first) in enumerate(windows(n, window, stride)):
        assert end - begin <= window
        if i:
            assert first - begin >= window - stride  # context of the first newly scored token
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_non_overlapping_windows_skip_each_first_token_as_transformers_does():
    assert [first for _, _, first in windows(100, 32, 32)] == [1, 33, 65, 97]


def test_windows_refuse_a_bad_stride():
    with pytest.raises(LoraforgeError, match="stride"):
        list(windows(10, 4, 5))


def _transformers_strided_ppl(model, ids: list[int], window: int, stride: int) -> float:
    """The loop of transformers' "perplexity of fixed-length models" guide, on its own loss."""
    seq = torch.tensor([ids])
    nll_sum, counted, prev_end = 0.0, 0, 0
    for begin in range(0, seq.shape[1], stride):
        end = min(begin + window, seq.shape[1])
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        counted += valid
        prev_end = end
        if end == seq.shape[1]:
            break
    return math.exp(nll_sum / counted)


@pytest.mark.slow
@pytest.mark.parametrize("window,stride", [(128, 64), (96, 96), (1024, 512)])
def test_perplexity_equals_transformers_strided_loss(pretrained_llama, text_file, window, stride):
    from transformers import AutoModelForCausalLM

    from loraforge.tokenizer import load_tokenizer

    report = perplexity(pretrained_llama, text_file, window=window, stride=stride)
    tokenizer = load_tokenizer(pretrained_llama)
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(pretrained_llama, dtype=torch.float32).eval()
    assert report["tokens"] == len(ids) > 600
    assert report["scored_tokens"] == len(ids) - (1 if stride < window else len(ids) // window + 1)
    assert report["perplexity"] == pytest.approx(_transformers_strided_ppl(model, ids, window, stride),
                                                 rel=1e-5)
    assert report["perplexity"] < 200  # a pre-trained model, not a random one (vocabulary 2000)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["pretrained-f32", "learned-f16"])
def test_gguf_perplexity_agrees_with_its_hf_source(which, request, text_file):
    if which == "pretrained-f32":
        hf, gguf = request.getfixturevalue("pretrained_llama"), request.getfixturevalue("pretrained_f32")
    else:
        hf, gguf = request.getfixturevalue("learned_run")[1].output_dir, request.getfixturevalue("learned_f16")
    text = text_file.read_text(encoding="utf-8")
    theirs, ours = open_scorer(hf), open_scorer(gguf, n_ctx=128)
    try:
        assert isinstance(ours, GGUFScorer)
        assert ours.tokenize(text) == theirs.tokenize(text)  # the same ids in both engines
    finally:
        theirs.close()
        ours.close()
    a = perplexity(hf, text_file, window=128)
    b = perplexity(gguf, text_file, window=128)
    assert (a["engine"], b["engine"]) == ("hf", "llamacpp")
    assert a["scored_tokens"] == b["scored_tokens"]
    assert abs(b["perplexity"] / a["perplexity"] - 1) < 0.005, (a["perplexity"], b["perplexity"])


@pytest.mark.slow
def test_token_logprobs_of_both_engines_match_per_token(pretrained_llama, pretrained_f32, text_file):
    hf, gguf = open_scorer(pretrained_llama), open_scorer(pretrained_f32, n_ctx=64)
    try:
        ids = hf.tokenize(text_file.read_text(encoding="utf-8"))[:200]
        a, b = token_logprobs(hf, ids, 64, 32), token_logprobs(gguf, ids, 64, 32)
    finally:
        hf.close()
        gguf.close()
    assert a.shape == b.shape == (199,)
    assert abs(a - b).max() < 5e-3 and abs(a - b).mean() < 5e-4  # F32 in both: summation order only


@pytest.mark.slow
def test_cli_writes_eval_json_and_md(pretrained_llama, text_file, tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", str(pretrained_llama), "--text", str(text_file), "--window", "128",
                 "-o", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert report["window"] == 128 and report["stride"] == 64 and report["perplexity"] > 1
    assert "| perplexity |" in (out / "eval.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]
    assert f"{report['perplexity']:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty", "whitespace", "missing", "no-model", "window"])
def test_bad_input_exits_2_and_writes_nothing(case, tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text({"empty": "", "whitespace": " \n\n"}.get(case, "春天来了。"), encoding="utf-8")
    model = str(tmp_path / "nope") if case == "no-model" else str(tiny_llama)
    args = ["eval", "ppl", model, "--text", str(tmp_path / "absent.txt" if case == "missing" else text),
            "-o", str(tmp_path / "out")]
    if case == "window":
        args += ["--window", "4096"]
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = {"empty": "is empty", "whitespace": "is empty", "missing": "no such file", "no-model": "no such model directory",
                "window": "longer than the 1024 tokens"}[case]
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_refused_before_any_work(tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("春天来了。", encoding="utf-8")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval.json").write_text("{}", encoding="utf-8")
    assert main(["eval", "ppl", str(tiny_llama), "--text", str(text), "-o", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "eval.json").read_text(encoding="utf-8") == "{}"
