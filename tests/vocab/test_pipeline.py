"""Through the pipeline: pt on the extended vocabulary (resized automatically), sft on top,
export to GGUF — and sentencepiece, transformers and llama.cpp cut Chinese into the same ids."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from safetensors import safe_open

from loraforge.config import load_config
from loraforge.errors import LoraforgeError
from loraforge.eval.parity import PROBES
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.hf import merge_to_hf
from loraforge.tokenizer import load_tokenizer
from loraforge.train.run import train
from loraforge.vocab.merge import merge_vocab
from loraforge.vocab.resize import resize_model

from conftest import DATA_DIR

# full-width punctuation, Chinese/English/digits mixed, rare characters that fall back to bytes
PARITY_SET = PROBES + [
    "“你好”，他说：「今天（星期三）下雨吗？」——不知道……", "ＡＢＣ全角字母１２３和半角abc123混排",
    "Python 3.11 比 3.10 快 25%，GPU 显存 24GB。", "龘 饕餮 耄耋 鳕鱼 𠀀 〇 ㊣", "  两个空格  和\t制表符\n换行",
    "中文English中文123中文", "。", "", "a", "▁已经有下划线▁的文本",
] + (DATA_DIR / "zh_heldout.txt").read_text(encoding="utf-8").splitlines()


def _config(stage, model, output_dir, *overrides):
    return load_config(None, [
        f"stage={stage}", f"model.path={model}", f"train.output_dir={output_dir}", f"data.dir={DATA_DIR}",
        "data.block_size=64", "data.cutoff_len=128", "train.batch_size=4", "train.max_steps=2",
        "train.logging_steps=1", "train.save_steps=100000", "lora.r=4", "train.seed=0", *overrides])


def _adapter_rows(run_dir):
    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_slice(k).get_shape()[0] for k in f.keys() if "modules_to_save" in k or "embed" in k}


@pytest.fixture(scope="module")
def runs(small_base_random, extended_tokenizer, zh_model, tmp_path_factory):
    """pt (auto-resized) → merge → resize to a tokenizer with [PAD] → sft with embeddings trained."""
    root = tmp_path_factory.mktemp("pipeline")
    pt = root / "pt"
    result = train(_config("pt", small_base_random, pt, f"model.tokenizer={extended_tokenizer}",
                           "data.datasets=zh_corpus", "train.save_steps=2"))  # checkpoint-2 = the last step
    merged = merge_to_hf(small_base_random, [pt], root / "merged_pt")
    with_pad = merge_vocab(small_base_random, zh_model, root / "tok_pad", pad_token="[PAD]").out_dir
    merged_pad = root / "merged_pt_pad"
    resize_model(merged, with_pad, merged_pad)
    sft = root / "sft"
    train(_config("sft", merged_pad, sft, "data.datasets=alpaca_zh_demo", "data.template=llama2-zh",
                  "lora.modules_to_save=embed_tokens,lm_head", "data.max_samples=8"))
    return {"root": root, "pt": pt, "merged": merged, "merged_pad": merged_pad, "sft": sft, "pt_result": result,
            "with_pad": with_pad}


@pytest.mark.slow
def test_pt_run_resizes_and_trains_the_embeddings(runs, extended_tokenizer, capfd):
    n = len(load_tokenizer(extended_tokenizer))
    rows = _adapter_rows(runs["pt"])
    assert rows and set(rows.values()) == {n}, rows
    saved = (runs["pt"] / "loraforge.yaml").read_text()
    assert "embed_tokens" in saved and "lm_head" in saved  # the resolved config says what was trained
    assert json.loads((runs["merged"] / "config.json").read_text())["vocab_size"] == n
    assert (runs["pt"] / "tokenizer.model").read_bytes() == (extended_tokenizer / "tokenizer.model").read_bytes()


@pytest.mark.slow
def test_gguf_carries_the_extended_vocabulary_and_training_llama_cpp_and_sentencepiece_agree(runs, small_base_random, tmp_path):
    import llama_cpp

    out = export_gguf(small_base_random, [runs["pt"], runs["sft"]], tmp_path / "zh.gguf", "f16")
    tokenizer = load_tokenizer(runs["sft"])  # what training used: sentencepiece's ids
    n = len(tokenizer)
    assert n == len(load_tokenizer(runs["pt"])) + 1 and tokenizer.pad_token == "[PAD]"
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.n_vocab() == n
    import gguf

    shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(out).tensors}
    assert shapes["token_embd.weight"] == shapes["output.weight"] == [64, n]  # ggml lists the row length first
    sp = spm.SentencePieceProcessor(model_file=str(runs["sft"] / "tokenizer.model"))
    mismatches = []
    for text in PARITY_SET:
        want = sp.encode(text)
        hf = tokenizer.encode(text, add_special_tokens=False)
        cpp = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if not want == hf == cpp:
            mismatches.append((text, want, hf, cpp))
    assert mismatches == []
    # the rare characters really fall back to bytes, and new pieces are used
    assert any(p.startswith("<0x") for p in sp.encode("龘 饕餮", out_type=str))
    assert max(sp.encode("".join(PARITY_SET))) >= 1500


@pytest.mark.slow
def test_reversed_adapter_order_is_caught(runs, small_base_random, tmp_path):
    n = len(load_tokenizer(runs["pt"]))
    with pytest.raises(LoraforgeError, match=rf"adapter 2 .* has vocab {n} < adapter 1's {n + 1} .* wrong order"):
        export_gguf(small_base_random, [runs["sft"], runs["pt"]], tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_wrong_tokenizer_for_the_model_is_caught(runs, small_base_random, small_base_tokenizer, extended_tokenizer,
                                               tmp_path):
    n_pad = len(load_tokenizer(runs["with_pad"]))
    # the original 1500-piece tokenizer on the extended model: ids would mean other tokens
    with pytest.raises(LoraforgeError, match=rf"has 1500 tokens but model.path=.* carries its own {n_pad}-token"):
        train(_config("sft", runs["merged_pad"], tmp_path / "a", f"model.tokenizer={small_base_tokenizer}",
                      "data.datasets=alpaca_zh_demo"))
    # an extended tokenizer on the small base in an sft run: resizing belongs to pt or vocab resize
    with pytest.raises(LoraforgeError, match=r"has \d+ tokens but the model's embedding has 1500 rows.*vocab resize"):
        train(_config("sft", small_base_random, tmp_path / "b", f"model.tokenizer={extended_tokenizer}",
                      "data.datasets=alpaca_zh_demo"))
    # another vocabulary of the same size: every id would mean another piece
    from loraforge.tiny import build_spm_tokenizer

    part = tmp_path / "other.txt"
    part.write_text("\n".join((DATA_DIR / "zh_corpus.txt").read_text(encoding="utf-8").splitlines()[200:260]),
                    encoding="utf-8")
    other = build_spm_tokenizer([part], tmp_path / "other_tok", vocab_size=1500)
    with pytest.raises(LoraforgeError, match=r"does not extend the model's .* id \d+ is"):
        train(_config("sft", small_base_random, tmp_path / "d", f"model.tokenizer={other}",
                      "data.datasets=alpaca_zh_demo"))
    with pytest.raises(LoraforgeError, match=r"method: prompt_tuning does not train new embedding rows"):
        train(_config("pt", small_base_random, tmp_path / "c", f"model.tokenizer={extended_tokenizer}",
                      "data.datasets=zh_corpus", "method=prompt_tuning"))


def _with_tokenizer_of(adapter_dir, tokenizer_dir, out):
    """A copy of `adapter_dir` that carries `tokenizer_dir`'s tokenizer, as a run trained with it would."""
    import shutil

    shutil.copytree(adapter_dir, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.mark.slow
def test_adapter_tokenizer_that_does_not_fit_the_chain_is_caught(runs, small_base_random, small_base_tokenizer,
                                                                 tmp_path):
    from conftest import random_adapter

    n = len(load_tokenizer(runs["pt"]))
    # sft trained with the base's 1500-token tokenizer on top of the pt run's extended vocabulary
    old = _with_tokenizer_of(runs["sft"], small_base_tokenizer, tmp_path / "sft-old-tokenizer")
    with pytest.raises(LoraforgeError, match=rf"adapter 2 .* 1500-token tokenizer, adapter 1 .* {n}-token one.*"
                                             r"trained with the old tokenizer"):
        export_gguf(small_base_random, [runs["pt"], old], tmp_path / "x.gguf", "f16")
    # a LoRA trained on the resized model, exported onto the small base without the pt adapter
    lora_only = _with_tokenizer_of(random_adapter(runs["merged_pad"], tmp_path / "lora", 5, r=4), runs["with_pad"],
                                   tmp_path / "lora-tok")
    with pytest.raises(LoraforgeError, match=rf"adapter 1 .* {n + 1}-token tokenizer but the embedding it applies "
                                             r"to has 1500 rows.*pass the adapter that grew it"):
        export_gguf(small_base_random, [lora_only], tmp_path / "y.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "lora-tok", "sft-old-tokenizer"]


@pytest.mark.slow
def test_a_checkpoint_of_the_resized_run_exports_like_the_run(runs, small_base_random, tmp_path):
    # peft saves a checkpoint's resized embeddings three times (plain, `.modules_to_save.`, and the
    # untrained `.original_module.`): the trained one must be what flows into the export
    checkpoint = runs["pt"] / "checkpoint-2"
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        assert any(".original_module." in k for k in f.keys())
    from_checkpoint = merge_to_hf(small_base_random, [checkpoint], tmp_path / "from-checkpoint")
    with safe_open(from_checkpoint / "model.safetensors", "pt") as ours, \
            safe_open(runs["merged"] / "model.safetensors", "pt") as want:
        assert sorted(ours.keys()) == sorted(want.keys())
        for key in want.keys():
            assert ours.get_tensor(key).equal(want.get_tensor(key)), key
