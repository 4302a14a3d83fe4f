"""`loraforge gguf inspect`: the report against numbers computed from the file and the model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from loraforge.data.templates import get_template, jinja_template
from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.inspect import describe_gguf

# bytes per value of each type in the files below: Q8_0 blocks are 32 int8 + one f16 scale
BYTES_PER_VALUE = {"F32": 4, "F16": 2, "Q8_0": 34 / 32}


def report_rows(text: str) -> dict[str, str]:
    rows = [re.match(r"(\S.*?)\s{2,}(.*)", line).groups() for line in text.splitlines()]
    return dict(rows)


def inspect_cli(path):
    return subprocess.run([sys.executable, "-m", "loraforge", "gguf", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    return {quant: export_gguf(tiny_llama, [], folder / f"m-{quant}.gguf", quant) for quant in ("q8_0", "f16")}


@pytest.mark.parametrize("quant, ftype", [("q8_0", "MOSTLY_Q8_0"), ("f16", "MOSTLY_F16")])
def test_counts_params_and_bits_per_weight(exported, tiny_llama, quant, ftype):
    path = exported[quant]
    rows = report_rows(describe_gguf(path))
    reader = gguf.GGUFReader(path)

    by_type = Counter(t.tensor_type.name.lower() for t in reader.tensors)
    shown = dict(re.findall(r"(\S+) (\d+)", rows["tensors"].split(": ", 1)[1]))
    assert {name: int(n) for name, n in shown.items()} == by_type
    assert rows["tensors"].startswith(f"{len(reader.tensors)}: ")

    # every weight of the HF checkpoint is one GGUF parameter (llama.cpp recomputes rope, stores nothing else)
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        params = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    assert rows["parameters"].startswith(f"{params:,} ")

    nbytes = sum(int(np.prod(t.shape)) * BYTES_PER_VALUE[t.tensor_type.name] for t in reader.tensors)
    assert f"({int(nbytes):,} bytes)" in rows["tensor bytes"]
    assert rows["bits per weight"] == f"{nbytes * 8 / params:.2f}"
    assert f"({path.stat().st_size:,} bytes)" in rows["file size"]

    config = json.loads((tiny_llama / "config.json").read_text())
    assert rows["file type"] == f"{ftype} (ftype {int(gguf.LlamaFileType[ftype])})"
    assert rows["architecture"] == "llama"
    assert rows["layers"] == str(config["num_hidden_layers"])
    assert rows["embedding"] == str(config["hidden_size"])
    assert rows["heads"] == f"{config['num_attention_heads']} (kv {config['num_key_value_heads']})"
    assert rows["context"] == str(config["max_position_embeddings"])
    assert rows["vocab size"] == str(config["vocab_size"])
    assert rows["special tokens"] == "bos 1 '<s>'  eos 2 '</s>'"
    assert rows["chat template"] == "none"


def test_loraforge_chat_template_is_named(tiny_llama, tmp_path):
    base = shutil.copytree(tiny_llama, tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = jinja_template(get_template("llama2-zh"))
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    path = export_gguf(base, [], tmp_path / "chat.gguf", "f16")
    assert report_rows(describe_gguf(path))["chat template"] == "loraforge 'llama2-zh'"


def test_adapter_shows_alpha(tmp_path):
    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((8, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rows = report_rows(describe_gguf(path))
    assert rows["kind"] == "LoRA adapter"
    assert rows["lora alpha"] == "16"
    assert rows["tensors"] == "2: f32 2" and rows["parameters"].startswith("1,024 ")


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated or damaged GGUF"),
    (lambda data: data[:20], "truncated or damaged GGUF"),
    (lambda data: b"", "the file is empty"),
    (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
])
def test_damaged_file_is_exit_2_without_traceback(exported, tmp_path, damage, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(exported["q8_0"].read_bytes()))
    result = inspect_cli(bad)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {bad}: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_text_file_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    with pytest.raises(LoraforgeError, match=r"notes.txt: not a GGUF file — it starts with b'hello, n'"):
        describe_gguf(text)


def test_cli_prints_the_report(exported):
    result = inspect_cli(exported["q8_0"])
    assert result.returncode == 0, result.stderr
    assert report_rows(result.stdout)["file type"].startswith("MOSTLY_Q8_0")
