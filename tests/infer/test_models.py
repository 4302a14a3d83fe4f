"""Model references: every command resolves HF dirs, adapter dirs and .gguf files one way."""

from __future__ import annotations

import json

import pytest

from loraforge.errors import LoraforgeError
from loraforge.models import context_length, resolve_model


def hf_dir(path, positions=4096):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions}))
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def adapter_dir(path, base, tokenizer=True):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                          "base_model_name_or_path": str(base)}))
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


def test_hf_dir(tmp_path):
    ref = resolve_model(str(hf_dir(tmp_path / "base")))
    assert (ref.kind, ref.base_dir, ref.adapter_dirs, ref.tokenizer_dir) == ("hf", tmp_path / "base", (), tmp_path / "base")
    assert ref.name == "base" and context_length(ref) == 4096


def test_adapter_dir_loads_its_base_and_uses_its_own_tokenizer(tmp_path):
    base = hf_dir(tmp_path / "base")
    ref = resolve_model(adapter_dir(tmp_path / "sft", base))
    assert ref.kind == "adapter" and ref.base_dir == base
    assert ref.adapter_dirs == (tmp_path / "sft",) and ref.tokenizer_dir == tmp_path / "sft"


def test_adapter_on_an_adapter_run_follows_the_chain_in_training_order(tmp_path):
    base = hf_dir(tmp_path / "base")
    pt = adapter_dir(tmp_path / "pt", base)
    sft = adapter_dir(tmp_path / "sft", pt, tokenizer=False)
    ref = resolve_model(sft)
    assert ref.base_dir == base and ref.adapter_dirs == (pt, sft) and ref.tokenizer_dir == pt


def test_adapter_whose_base_is_missing_says_to_pass_base(tmp_path):
    sft = adapter_dir(tmp_path / "sft", "meta-llama/Llama-2-7b-hf")
    with pytest.raises(LoraforgeError, match=r"names its base 'meta-llama/Llama-2-7b-hf'.*pass --base PATH"):
        resolve_model(sft)
    other = hf_dir(tmp_path / "local-copy")
    assert resolve_model(sft, base=other).base_dir == other
    with pytest.raises(LoraforgeError, match="--base .*no config.json"):
        resolve_model(sft, base=tmp_path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", r"no such model directory: .*nope — pass a HF model directory"),
    (lambda p: (p / "x.gguf").write_bytes(b"PK\x03\x04zip") and p / "x.gguf", r"is not a GGUF file \(it starts with b'PK"),
    (lambda p: (p / "empty").mkdir() or p / "empty", r"not a model directory — no config.json .* or adapter_config.json"),
    (lambda p: (p / "g").mkdir() or (p / "g" / "m.gguf").write_bytes(b"GGUF") and p / "g", r"It holds m.gguf: pass that file"),
    (lambda p: (p / "w").mkdir() or (p / "w" / "config.json").write_text("{}") and p / "w", r"has config.json but no weights"),
])
def test_bad_references_say_what_to_pass(tmp_path, make, message):
    with pytest.raises(LoraforgeError, match=message):
        resolve_model(make(tmp_path))


def test_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    ref = resolve_model(tmp_path / "m.gguf")
    assert (ref.kind, ref.name, ref.base_dir, ref.tokenizer_dir) == ("gguf", "m", None, None)
