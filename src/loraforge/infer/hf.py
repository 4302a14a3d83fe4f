"""Answer prompts with transformers (+ peft for an unmerged adapter).

A run directory is enough: its tokenizer carries the trained template, its
adapter_config.json names the base model. Greedy decoding stops at EOS or the
template's end token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import Template, get_template, render_prompt
from loraforge.data.tokenize import continuation_ids
from loraforge.errors import LoraforgeError


def template_of(run_dir: Path) -> Template:
    """The template a run was trained with, from its loraforge.yaml."""
    import yaml

    saved = Path(run_dir) / "loraforge.yaml"
    if not saved.exists():
        raise LoraforgeError(f"{run_dir} has no loraforge.yaml: not a loraforge run directory")
    return get_template(yaml.safe_load(saved.read_text(encoding="utf-8"))["data"]["template"])


def load_model(path: Path):
    """A model dir, or an adapter dir whose adapter_config.json names its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    adapter_cfg = path / "adapter_config.json"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if adapter_cfg.exists():
        from peft import PeftModel

        base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def greedy_answer(model, tokenizer, template: Template, question: str, system: str | None = None,
                  max_new_tokens: int = 64) -> str:
    prompt = render_prompt(template, system, [Turn("user", question)], tokenizer.eos_token or "",
                           bos_token=tokenizer.bos_token or "")
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=True)])
    stops = {tokenizer.eos_token_id}
    if template.end_token:
        stops.update(continuation_ids(tokenizer, template.end_token)[:1])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(t for t in stops if t is not None),
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def exact_matches(model, tokenizer, template: Template, conversations: list[Conversation],
                  max_new_tokens: int = 64) -> list[tuple[str, str, str]]:
    """(question, expected, generated) for single-turn conversations."""
    rows = []
    for conv in conversations:
        question, answer = conv.turns[-2].text, conv.turns[-1].text
        got = greedy_answer(model, tokenizer, template, question, conv.system, max_new_tokens)
        rows.append((question, answer, got))
    return rows
