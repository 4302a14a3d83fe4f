"""`export gguf --verify`: proof that the GGUF answers like the trained model.

Three comparisons between llama.cpp (the exported file, through llama-cpp-python) and
transformers with the adapters applied through peft, the model as trained:

- token ids on a fixed set of Chinese, English and mixed strings (full-width
  punctuation, digits, spaces, newlines, emoji, a chat-template prompt) — must be equal;
- next-token distributions at every position of a few prompts: top-1 agreement,
  KL(P_hf ‖ P_gguf) and the largest logit difference, judged by the file's type;
- greedy continuations of template prompts, token for token.

The report goes to `<output>.parity.json`; a failed check raises after writing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError

PROBES = ["春天来了，公园里的花都开了。", "Hello world, this is a test.", "混合 English 和中文 2024年 GPU",
          "全角标点：，。！？：“引号”（括号）", "数字 1234567890 和  两个空格", "第一行\n第二行\n\n空行",
          "表情 🙂🚀 结束", "  leading spaces and trailing  ", "Tab\tand 〜 rare 龘 characters"]
PROMPTS = ["请用一句话介绍一下长城。", "What is machine learning? Answer briefly.", "把这句话翻译成英文：今天天气很好。"]
GENERATED_TOKENS = 24

# file type (llama_ftype) → (minimum top-1 agreement, maximum mean KL); others: LOW_BIT
FLOAT_TYPES = {0, 1, 32}
# top-1 is judged where transformers' best token leads the second by more than this (logits)
DECISIVE_MARGIN = 0.1
# 4-bit and below: top-1 is reported, not judged (near-ties flip); KL catches a wrong file
THRESHOLDS = {"float": (0.99, 1e-3), "q8_0": (0.90, 0.05), "low-bit": (0.0, 0.5)}


def _limits(file_type: int) -> tuple[str, tuple[float, float]]:
    kind = "float" if file_type in FLOAT_TYPES else "q8_0" if file_type == 7 else "low-bit"
    return kind, THRESHOLDS[kind]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray) -> dict:
    """Per-position agreement of two [positions, vocab] logit arrays (reference = transformers)."""
    log_p, log_q = _log_softmax(reference), _log_softmax(ours)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    agree = ours.argmax(-1) == reference.argmax(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN  # a near-tie may flip under any rounding
    return {"positions": int(len(ours)), "top1": float(agree.mean()),
            "top1_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
            "decisive_positions": int(decisive.sum()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "max_abs_diff": float(np.abs(ours - reference).max())}


def reference_model(base_dir: Path, adapter_dirs: list[Path]):
    """transformers fp32 with the adapters as trained: earlier ones merged in order, the last one live."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.export.weights import read_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = [r for r in (read_adapter(a).vocab_rows for a in adapter_dirs) if r]
    if rows and rows[-1] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows[-1])  # an extended vocabulary: the adapter carries the rows
    for index, adapter in enumerate(adapter_dirs):
        model = PeftModel.from_pretrained(model, adapter)
        if index < len(adapter_dirs) - 1:
            model = model.merge_and_unload()
    return model.eval()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _greedy_gguf(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    got = []
    for _ in range(n):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    return got


def _tokenization(llm, tokenizer, texts: list[str]) -> list[dict]:
    rows = []
    for text in texts:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        theirs = tokenizer.encode(text)
        row = {"text": text, "match": ours == theirs, "tokens": len(theirs)}
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            row.update(first_difference=at, gguf=ours[at:at + 3], hf=theirs[at:at + 3],
                       gguf_pieces=tokenizer.convert_ids_to_tokens(ours[at:at + 3]),
                       hf_pieces=tokenizer.convert_ids_to_tokens(theirs[at:at + 3]))
        rows.append(row)
    return rows


def _template_prompts(tokenizer) -> list[str]:
    from loraforge.data.records import Turn
    from loraforge.data.templates import get_template, render_prompt, template_name_in

    name = template_name_in(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
    if name is None:
        return []
    template = get_template(name)
    return [render_prompt(template, None, [Turn("user", p)], tokenizer.eos_token or "",
                          bos_token=tokenizer.bos_token or "") for p in PROMPTS]


def verify_export(gguf_path: Path, base_dir: Path, adapter_dirs: list[Path], report_path: Path) -> dict:
    import llama_cpp
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    from loraforge import __version__
    from loraforge.export.weights import read_adapter, tokenizer_source

    adapter_dirs = [Path(a) for a in adapter_dirs]
    source = tokenizer_source(base_dir, [read_adapter(a) for a in adapter_dirs])
    # the tokenizer.json as written: AutoTokenizer would rebuild some (Qwen2) from their class
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    rendered = _template_prompts(tokenizer)
    prompts = rendered or PROMPTS
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    file_type = int(llm.metadata.get("general.file_type", 0))
    kind, (min_top1, max_kl) = _limits(file_type)
    model = reference_model(base_dir, adapter_dirs)

    tokens = _tokenization(llm, tokenizer, PROBES + rendered[:1])
    logits = []
    for text in PROBES[:3] + prompts:
        ids = tokenizer.encode(text)
        logits.append({"text": text, **compare_logits(_gguf_logits(llm, ids), _hf_logits(model, ids))})
    generation = []
    for text in prompts[:2]:
        ids = tokenizer.encode(text)
        hf, ours = _greedy_hf(model, ids, GENERATED_TOKENS), _greedy_gguf(llm, ids, GENERATED_TOKENS)
        same = next((i for i, (a, b) in enumerate(zip(hf, ours)) if a != b), len(hf))
        generation.append({"prompt": text, "identical": hf == ours, "common_prefix": same,
                           "hf": tokenizer.decode(hf), "gguf": tokenizer.decode(ours)})

    positions = sum(r["positions"] for r in logits)
    decisive = sum(r["decisive_positions"] for r in logits)
    overall = {"positions": positions, "top1": sum(r["top1"] * r["positions"] for r in logits) / positions,
               "decisive_positions": decisive,
               "top1_decisive": sum(r["top1_decisive"] * r["decisive_positions"] for r in logits) / max(decisive, 1),
               "kl_mean": sum(r["kl_mean"] * r["positions"] for r in logits) / positions,
               "kl_max": max(r["kl_max"] for r in logits), "max_abs_diff": max(r["max_abs_diff"] for r in logits)}
    problems = [f"{sum(not t['match'] for t in tokens)} of {len(tokens)} strings tokenize differently"] \
        if not all(t["match"] for t in tokens) else []
    if overall["top1_decisive"] < min_top1:
        problems.append(f"top-1 agreement {overall['top1_decisive']:.1%} (where the reference is not a near-tie) "
                        f"< {min_top1:.0%} expected for a {kind} file")
    if overall["kl_mean"] > max_kl:
        problems.append(f"mean KL {overall['kl_mean']:.3g} > {max_kl:g} expected for a {kind} file")
    report = {"file": str(gguf_path), "file_type": file_type, "kind": kind, "base": str(base_dir),
              "adapters": [str(a) for a in adapter_dirs], "thresholds": {"top1": min_top1, "kl_mean": max_kl},
              "tokenization": tokens, "logits": logits, "overall": overall, "generation": generation,
              "verdict": "FAIL" if problems else "PASS", "problems": problems,
              "versions": {"loraforge": __version__, "llama_cpp_python": llama_cpp.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    report_path = Path(report_path)
    tmp = report_path.with_name(f".{report_path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(report_path)
    if problems:
        raise LoraforgeError(f"{gguf_path} does not answer like base + adapters: {'; '.join(problems)} — "
                             f"details in {report_path}. Was it exported from other adapters or another base?")
    return report


def _fit(text: str, width: int) -> str:
    """`text` cut and padded to `width` terminal columns (CJK characters take two)."""
    import unicodedata

    out, used = "", 0
    for char in text:
        w = 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used + w > width - 2:
            out, used = out + "…", used + 1
            break
        out, used = out + char, used + w
    return out + " " * (width - used)


def format_parity(report: dict) -> str:
    """The short table a user reads after `--verify`."""
    lines = [f"{'prompt':<34} {'tokens':>6} {'top-1':>7} {'mean KL':>10} {'max |Δ|':>9}"]
    for row in report["logits"]:
        lines.append(f"{_fit(row['text'].replace(chr(10), '⏎'), 34)} {row['positions']:>6} {row['top1']:>7.1%} {row['kl_mean']:>10.2e} "
                     f"{row['max_abs_diff']:>9.4f}")
    o = report["overall"]
    lines.append(f"{_fit('all', 34)} {o['positions']:>6} {o['top1']:>7.1%} {o['kl_mean']:>10.2e} {o['max_abs_diff']:>9.4f}")
    tokens = report["tokenization"]
    gen = report["generation"]
    lines.append(f"tokenization: {sum(t['match'] for t in tokens)}/{len(tokens)} strings identical; greedy "
                 f"generation: {sum(g['identical'] for g in gen)}/{len(gen)} identical over {GENERATED_TOKENS} tokens")
    verdict = report["verdict"]
    reason = "; ".join(report["problems"]) or (f"{report['kind']} file: top-1 ≥ {report['thresholds']['top1']:.0%} "
                                               f"(where not a near-tie: {o['top1_decisive']:.1%}), "
                                               f"mean KL ≤ {report['thresholds']['kl_mean']:g}")
    lines.append(f"{verdict}: {reason}")
    return "\n".join(lines)
