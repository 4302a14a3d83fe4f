"""Session fixtures: tiny models built once from the bundled corpus; nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA_DIR = EXAMPLES / "data"
CORPUS = DATA_DIR / "zh_corpus.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tokenized-data cache in a temp dir, never the user's ~/.cache."""
    os.environ["LORAFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece BPE tokenizer trained on the bundled Chinese corpus."""
    from loraforge.tiny import build_spm_tokenizer

    return build_spm_tokenizer([CORPUS], tmp_path_factory.mktemp("spm"), vocab_size=2000)


@pytest.fixture(scope="session")
def tiny_llama(spm_tokenizer, tmp_path_factory) -> Path:
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("llama"), TinyShape())


@pytest.fixture(scope="session")
def tiny_qwen2(spm_tokenizer, tmp_path_factory) -> Path:
    """Qwen2-style: q/k/v projections with biases."""
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("qwen2"), TinyShape(arch="qwen2"))


@pytest.fixture(scope="session")
def tiny_tied(spm_tokenizer, tmp_path_factory) -> Path:
    """LLaMA with tied input/output embeddings."""
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("tied"), TinyShape(tie_embeddings=True))


def sft_config(model: Path, output_dir: Path, *overrides: str):
    """A small SFT config on the bundled instructions; overrides are key=value strings."""
    from loraforge.config import load_config

    base = [
        f"model.path={model}", f"train.output_dir={output_dir}", f"data.dir={DATA_DIR}",
        "data.datasets=alpaca_zh_demo", "data.template=chinese-alpaca", "data.cutoff_len=256",
        "train.batch_size=8", "train.logging_steps=1", "train.save_steps=100000", "train.seed=0",
    ]
    return load_config(None, [*base, "stage=sft", *overrides])


@pytest.fixture(scope="session")
def bpe_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Byte-level BPE tokenizers in Llama-3 and Qwen2 style, trained on the bundled corpus."""
    from loraforge.tiny import build_bpe_tokenizer

    return {style: build_bpe_tokenizer([CORPUS], tmp_path_factory.mktemp(style), style, 800)
            for style in ("llama3", "qwen2")}


@pytest.fixture(scope="session")
def pretrained_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny LLaMA after a few seconds of full pre-training on the bundled corpus.

    A random base cannot show that LoRA learns: its frozen final norm and small random
    lm_head cap the logit scale, so the loss cannot fall far whatever the adapter does.
    Every real base has trained ones; a short pre-training gives ours the same.
    """
    from loraforge.config import load_config
    from loraforge.train.run import train

    out = tmp_path_factory.mktemp("pretrained")
    train(load_config(None, [
        "stage=pt", "method=full", f"model.path={tiny_llama}", f"train.output_dir={out}",
        f"data.dir={DATA_DIR}", "data.datasets=zh_corpus", "data.block_size=128", "train.batch_size=16",
        "train.max_steps=200", "train.lr=5e-3", "train.logging_steps=10", "train.save_steps=100000",
        "train.overwrite_output_dir=true",
    ]))
    return out


def random_adapter(base, out, seed, **lora):
    """A LoRA adapter with random (non-zero) A and B, saved by peft itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        **lora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def learned_run(pretrained_llama, tmp_path_factory):
    """LoRA SFT until the tiny model knows its answers.

    The 16 single-turn bundled instructions with the shortest answers (10–16 characters)
    are what a 64-wide, 2-layer model can learn by heart in about 15 seconds.
    """
    import json

    from loraforge.train.run import train

    records = json.loads((DATA_DIR / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    single = sorted((r for r in records if not r.get("history") and not r.get("system")),
                    key=lambda r: len(r["output"]))
    data = tmp_path_factory.mktemp("data") / "short_answers.json"
    data.write_text(json.dumps(single[10:26], ensure_ascii=False), encoding="utf-8")
    out = tmp_path_factory.mktemp("runs") / "sft"
    config = sft_config(pretrained_llama, out, f"data.datasets={data}", "train.epochs=120", "train.lr=5e-3",
                        "lora.r=32", "train.batch_size=8")
    return config, train(config)


# Real SentencePiece models (../shared/fixtures/tokenizers: Meta's LLaMA-2 tokenizer.model and
# Chinese-LLaMA's chinese_sp.model); CI lays shared/ beside the clone as it is here
REAL_TOKENIZERS = ROOT.parent / "shared" / "fixtures" / "tokenizers"


@pytest.fixture(scope="session")
def real_tokenizers(spm_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Tokenizer dirs, table-driven next to the tiny one: LLaMA-2's 32,000 pieces, Chinese-LLaMA's
    recipe (LLaMA-2 + chinese_sp.model = 49,953 pieces) and a loraforge bpe model merged onto LLaMA-2."""
    from loraforge.vocab.merge import merge_vocab
    from loraforge.vocab.spm import save_hf_tokenizer
    from loraforge.vocab.train import train_vocab

    root = tmp_path_factory.mktemp("real_tokenizers")
    llama2 = root / "llama2"
    save_hf_tokenizer(REAL_TOKENIZERS / "llama2.model", llama2)
    chinese_llama = merge_vocab(llama2, REAL_TOKENIZERS / "chinese_sp.model", root / "chinese-llama").out_dir
    zh = train_vocab([CORPUS], root / "zh.model", 3000).model_file
    llama2_zh = merge_vocab(llama2, zh, root / "llama2-zh", scheme="ranked").out_dir
    return {"tiny": spm_tokenizer, "llama2": llama2, "chinese-llama": chinese_llama, "llama2+zh-ranked": llama2_zh}


@pytest.fixture(scope="session")
def real_tokenizer_models(real_tokenizers, tmp_path_factory) -> dict[str, Path]:
    """A random 32-wide, 1-layer LLaMA on each real tokenizer: enough for engines and GGUF vocabularies."""
    from loraforge.tiny import TinyShape, build_tiny_model

    shape = TinyShape(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64)
    return {name: build_tiny_model(folder, tmp_path_factory.mktemp(f"model-{name}"), shape)
            for name, folder in real_tokenizers.items()}


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; `make test` does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()
