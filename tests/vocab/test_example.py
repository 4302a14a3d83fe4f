"""The bundled end-to-end example: its config and the sft overrides of examples/zh-vocab.sh validate."""

from __future__ import annotations

import re

from loraforge.config import load_config

from conftest import EXAMPLES

CONFIG = EXAMPLES / "configs" / "zh-vocab-pt-sft.yaml"
SCRIPT = EXAMPLES / "zh-vocab.sh"


def test_pt_and_sft_steps_of_the_example_validate():
    pt = load_config(CONFIG)
    assert (pt.stage, pt.method, pt.lora.modules_to_save) == ("pt", "lora", ["embed_tokens", "lm_head"])
    assert pt.model.tokenizer and pt.model.tokenizer != pt.model.path
    script = SCRIPT.read_text()
    sft_line = next(line for line in script.replace("\\\n", " ").splitlines() if "stage=sft" in line)
    overrides = [w.replace('"$OUT', "runs/zh-vocab").replace('"', "") for w in sft_line.split() if "=" in w]
    sft = load_config(CONFIG, overrides)
    assert (sft.stage, sft.model.tokenizer, sft.lora.modules_to_save) == ("sft", None, [])
    assert sft.data.datasets == ["alpaca_zh_demo"] and sft.data.template == "llama2-zh"
    assert re.search(r"export gguf .*--adapter \"\$OUT/pt,\$OUT/sft\"", script)
