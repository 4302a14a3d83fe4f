"""Adapter chains checked against the adapters' own records: sft trained on pt's merge is
refused with the pt step left out or the order swapped, by merge, export gguf and export
lora-gguf; the chains the records allow (and the one `chat runs/sft` loads) pass."""

from __future__ import annotations

import json
import shutil

import pytest

from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import LoraforgeError
from loraforge.export.chain import MERGED_FROM, TRAINED_ON, check_chain, fingerprint
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.hf import merge_to_hf
from loraforge.export.lora_gguf import export_lora_gguf
from loraforge.export.pth import merge_to_pth
from loraforge.models import resolve_model
from loraforge.train.run import train

from conftest import DATA_DIR, random_adapter


def _config(stage, model, output_dir, *overrides):
    return load_config(None, [
        f"stage={stage}", f"model.path={model}", f"train.output_dir={output_dir}", f"data.dir={DATA_DIR}",
        "data.block_size=64", "data.cutoff_len=512", "train.batch_size=4", "train.max_steps=2",
        "train.logging_steps=1", "train.save_steps=100000", "lora.r=4", "train.seed=0", *overrides])


@pytest.fixture(scope="module")
def chain(tiny_llama, tmp_path_factory):
    """base → ptA (LoRA pt) → merged = base + ptA → sftA (LoRA sft on merged)."""
    root = tmp_path_factory.mktemp("chain")
    pt = root / "ptA"
    train(_config("pt", tiny_llama, pt, "data.datasets=zh_corpus"))
    merged = merge_to_hf(tiny_llama, [pt], root / "merged")
    sft = root / "sftA"
    train(_config("sft", merged, sft, "data.datasets=alpaca_zh_demo", "data.max_samples=8",
                  "data.template=chinese-alpaca"))
    return {"base": tiny_llama, "pt": pt, "merged": merged, "sft": sft, "root": root}


def test_training_and_merging_leave_records(chain):
    record = json.loads((chain["sft"] / TRAINED_ON).read_text())["model"]
    assert record["path"] == str(chain["merged"].resolve())
    assert record["fingerprint"]["digest"] == fingerprint(chain["merged"])["digest"]
    made = record["made_from"]
    assert made["base"]["path"] == str(chain["base"].resolve())
    assert [a["path"] for a in made["adapters"]] == [str(chain["pt"].resolve())]
    assert (chain["merged"] / MERGED_FROM).exists()
    pt_record = json.loads((chain["pt"] / TRAINED_ON).read_text())["model"]
    assert pt_record["fingerprint"]["digest"] == fingerprint(chain["base"])["digest"] != record["fingerprint"]["digest"]


@pytest.mark.parametrize("order", ["pt left out", "swapped"])
def test_a_wrong_chain_is_refused_everywhere_before_writing(chain, tmp_path, order):
    adapters = [chain["sft"]] if order == "pt left out" else [chain["sft"], chain["pt"]]
    expected = r"sftA was trained on .*merged .*ptA merged into .*; you passed --base .*ptA is missing before it.*" \
               r"--adapter .*ptA,.*sftA.*--force"
    with pytest.raises(LoraforgeError, match=expected):
        export_gguf(chain["base"], adapters, tmp_path / "m.gguf", "f32")
    with pytest.raises(LoraforgeError, match=expected):
        merge_to_hf(chain["base"], adapters, tmp_path / "hf")
    with pytest.raises(LoraforgeError, match=expected):
        merge_to_pth(chain["base"], adapters, tmp_path / "pth")
    assert list(tmp_path.iterdir()) == []


def test_the_chains_the_records_allow_pass(chain, tmp_path, capfd):
    check_chain(chain["base"], [chain["pt"], chain["sft"]])
    check_chain(chain["merged"], [chain["sft"]])
    check_chain(chain["base"], [chain["pt"]])
    # what `chat runs/sftA` loads is one of them: chat and export follow the same records
    ref = resolve_model(chain["sft"])
    assert ref.base_dir == chain["merged"].resolve() and ref.adapter_dirs == (chain["sft"].resolve(),)
    check_chain(ref.base_dir, list(ref.adapter_dirs))
    # a copy of the base elsewhere is the same base: compared by fingerprint, not by path
    copy = shutil.copytree(chain["base"], tmp_path / "copied-base")
    check_chain(copy, [chain["pt"], chain["sft"]])
    assert "note" not in capfd.readouterr().err
    out = export_gguf(chain["base"], [chain["pt"], chain["sft"]], tmp_path / "ok.gguf", "f32")
    assert out.exists()


def test_an_extra_adapter_or_another_base_is_refused(chain):
    with pytest.raises(LoraforgeError, match=r"ptA was trained on .*; you passed .*ptA does not belong before it"):
        check_chain(chain["base"], [chain["pt"], chain["pt"]])
    with pytest.raises(LoraforgeError, match=r"ptA was trained on .*fingerprint [0-9a-f]{16}.*you passed --base .*merged"):
        check_chain(chain["merged"], [chain["pt"]])


def test_force_goes_on_with_a_note(chain, tmp_path, capfd):
    out = export_gguf(chain["base"], [chain["sft"]], tmp_path / "forced.gguf", "f32", force=True)
    assert out.exists()
    assert "--force given, going on: " in capfd.readouterr().err


def test_lora_gguf_checks_the_base_it_will_be_applied_to(chain, tmp_path):
    with pytest.raises(LoraforgeError, match=r"sftA was trained on .*ptA is missing before it"):
        export_lora_gguf(chain["sft"], tmp_path / "a.gguf", chain["base"])
    assert export_lora_gguf(chain["sft"], tmp_path / "a.gguf").exists()  # its recorded base: merged


def test_the_cli_refuses_with_exit_2_and_force_overrides(chain, tmp_path, capsys):
    args = ["export", "gguf", "--base", str(chain["base"]), "--adapter", str(chain["sft"]), "--quant", "f32",
            "-o", str(tmp_path / "m.gguf")]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_adapters_without_loraforge_records(chain, tiny_llama, tmp_path, capfd):
    # peft's base_model_name_or_path alone: the base it names is compared
    peft_only = random_adapter(tiny_llama, tmp_path / "peft", 3, r=4)
    check_chain(tiny_llama, [peft_only])
    with pytest.raises(LoraforgeError, match=r"peft was trained on .*merged"):
        check_chain(chain["merged"], [peft_only])
    # after other adapters it cannot be judged (peft keeps the base's name after a merge in memory)
    check_chain(tiny_llama, [chain["pt"], peft_only])
    assert "cannot say whether earlier adapters were merged into it" in capfd.readouterr().err
    # no record at all: a note
    config = json.loads((peft_only / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (peft_only / "adapter_config.json").write_text(json.dumps(config))
    check_chain(chain["merged"], [peft_only])
    assert "records no base model" in capfd.readouterr().err
    # a hub name that is not on this machine: a note, not a refusal
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (peft_only / "adapter_config.json").write_text(json.dumps(config))
    check_chain(chain["merged"], [peft_only])
    assert "not on this machine" in capfd.readouterr().err


def test_fingerprint_is_cheap_and_survives_resharding(chain, tmp_path, monkeypatch):
    resharded = merge_to_hf(chain["base"], [], tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list(resharded.glob("model-*.safetensors"))) > 1
    assert fingerprint(resharded)["digest"] == fingerprint(chain["base"])["digest"]
    # it reads a sample of each tensor, not the whole file
    import builtins

    read = []
    real_open = builtins.open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, n):
            self.handle.seek(n)

        def read(self, n=-1):
            data = self.handle.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Counting(real_open(path, mode, *a, **k))
                        if mode == "rb" else real_open(path, mode, *a, **k))
    fingerprint(chain["merged"])
    monkeypatch.undo()
    assert sum(read) < (chain["merged"] / "model.safetensors").stat().st_size / 4
