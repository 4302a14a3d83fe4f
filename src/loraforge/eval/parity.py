"""`export gguf --verify`: proof that the GGUF answers like the trained model.

Three comparisons between llama.cpp (the exported file, through llama-cpp-python) and
transformers in fp32 with the adapters applied through peft — the model as trained:

- token ids on a fixed set of Chinese, English and mixed strings (full-width
  punctuation, digits, spaces, newlines, emoji, a chat-template prompt) — must be equal;
- next-token distributions at every position of a few prompts: top-1 agreement,
  KL(P_hf ‖ P_gguf) and the largest logit difference, judged by the file's type;
- greedy continuations of template prompts, token for token (reported, not judged:
  one near-tie flipped by rounding changes every later token).

The report goes to `report_path` (the CLI: `<output>.parity.json`); a failed check
raises `ParityFailed` after writing it, so `loraforge export gguf --verify` exits non-zero.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.env import usable_cpus
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import Prompt, hf_prompt_ids, prompt_text, prompt_token_ids
from loraforge.infer.llamacpp import llama_tokenize
from loraforge.outputs import write_text
from loraforge.tokenizer import load_chain_tokenizer

PROBES = ["春天来了，公园里的花都开了。", "Hello world, this is a test.", "混合 English 和中文 2024年 GPU",
          "全角标点：，。！？：“引号”（括号）", "数字 1234567890 和  两个空格", "第一行\n第二行\n\n空行",
          "表情 🙂🚀 结束", "  leading spaces and trailing  ", "Tab\tand 〜 rare 龘 characters"]
# compared token for token only: runs of spaces and tabs (code, tables), text after a special token
TOKENIZER_PROBES = ["def f(x):\n    if x:\n        return x\n\treturn None", "| 列 | 值 |\n|----|----|\n|  a |  1 |",
                    "a" + " " * 20 + "b", "   ", "\n\n\n", "答</s>后面的文字", " Hello World!", "' era 3333 🦙.cpp"]
PROMPTS = ["请用一句话介绍一下长城。", "What is machine learning? Answer briefly.", "把这句话翻译成英文：今天天气很好。"]
GENERATED_TOKENS = 24
# top-1 is judged where transformers' best token leads the second by more than this many
# logits: a near-tie may flip under any rounding, F16's included, without anything being wrong
DECISIVE_MARGIN = 0.1


@dataclass(frozen=True)
class Limits:
    """What a file of one precision tier must reach; None: reported, not judged."""

    tier: str
    min_top1: float | None  # top-1 agreement where the reference is decisive
    max_kl: float | None  # mean KL(P_hf ‖ P_gguf), nats


# Ceilings sit 5-15x above what llama.cpp measures on LLaMA-3-8B against F16 (perplexity
# README, "LLaMA 3 8b Scoreboard": mean KLD Q8_0 0.0014, Q6_K 0.0055, Q5_K_M 0.011,
# Q5_0 0.022, Q4_K_M 0.031, Q4_0 0.072, Q3_K_M 0.10, Q2_K 0.45, IQ1_S 2.2; same top-1
# 97.7% at Q8_0, 91.9% at Q4_K_M), leaving room for smaller models, which lose more: a
# correct file passes, a file of another model does not. Below 4 bits the quantization
# error alone reaches what a wrong model gives, so only the tokenizer (and vocabulary)
# are judged there and the logits are reported.
FLOAT = Limits("float", 0.99, 1e-3)
TIERS = {
    **dict.fromkeys([0, 1, 32], FLOAT),  # F32, F16, BF16: rounding only
    7: Limits("8-bit", 0.90, 0.02),  # Q8_0
    **dict.fromkeys([8, 9, 16, 17, 18], Limits("5/6-bit", 0.80, 0.15)),  # Q5_0 Q5_1 Q5_K_S Q5_K_M Q6_K
    **dict.fromkeys([2, 3, 14, 15, 25, 30], Limits("4-bit", None, 0.5)),  # Q4_0 Q4_1 Q4_K_S/M IQ4_NL IQ4_XS
}
BELOW_4_BIT = Limits("below 4-bit", None, None)


def limits_for(file_type: int) -> Limits:
    return TIERS.get(file_type, BELOW_4_BIT)


def file_type_name(file_type: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {file_type}"


class ParityFailed(LoraforgeError):
    """The GGUF does not answer like base + adapters; `report` is what was written."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


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
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN
    return {"positions": int(len(ours)), "top1": float(agree.mean()),
            "top1_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
            "decisive_positions": int(decisive.sum()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "max_abs_diff": float(np.abs(ours - reference).max())}


def reference_model(base_dir: Path, adapter_dirs: list[Path]):
    """transformers fp32 with the adapters as trained: each earlier one merged in order, the last one live.

    A later adapter was trained on a base with the earlier ones already merged (pt, then sft on
    the result), so merging them in order rebuilds the base it saw; the last stays unmerged, as
    `loraforge chat` runs it, so peft's forward — not a merge like ours — makes the reference.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.export.weights import read_adapter

    if (Path(base_dir) / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        model = _model_from_stream(base_dir)
    for index, adapter in enumerate(adapter_dirs):
        rows = read_adapter(adapter).vocab_rows  # an extended vocabulary: modules_to_save carry the rows
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)  # peft overwrites them
        model = PeftModel.from_pretrained(model, adapter)
        if index < len(adapter_dirs) - 1:
            model = model.merge_and_unload()
    return model.eval()


def _model_from_stream(base_dir: Path):
    """A base transformers cannot load itself (Meta's consolidated.*.pth + params.json): the config and
    tensors export reads, put into the transformers model they describe."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.export.weights import base_config, merged_tensors, plan

    config = dict(base_config(base_dir))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                             dtype=torch.float32)
    state = {item.name: tensor for item, tensor in merged_tensors(plan(base_dir, []), [])}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("rotary_emb.inv_freq") and m != "lm_head.weight"]:
        raise LoraforgeError(f"{base_dir}: its tensors do not fill the model it describes (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy_hf(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Argmax decoding, ending at a stop id like `_greedy_gguf` (no min_new_tokens: it would mask EOS
    and change the argmax)."""
    import torch
    from transformers import GenerationConfig

    # a fresh config: a base's generation_config.json (repetition_penalty, …) would change the argmax
    plain = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop) or None,
                             pad_token_id=min(stop, default=0))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=plain)
    return out[0, len(ids):].tolist()


def _greedy_gguf(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    got: list[int] = []
    while len(got) < n:
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if got[-1] in stop:
            break
        llm.eval(got[-1:])
    return got


def _tokenization(llm, tokenizer, prompts: list[Prompt]) -> list[dict]:
    rows = []
    for prompt in prompts:
        ours = prompt_token_ids(prompt, llama_tokenize(llm), tokenizer.bos_token or "")
        theirs = hf_prompt_ids(tokenizer, prompt)
        row = {"text": prompt_text(prompt), "match": ours == theirs, "tokens": len(theirs)}
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            row.update(first_difference=at, gguf=ours[at:at + 3], hf=theirs[at:at + 3],
                       gguf_pieces=[llm._model.token_get_text(i) for i in ours[at:at + 3]],
                       hf_pieces=tokenizer.convert_ids_to_tokens(theirs[at:at + 3]))
        rows.append(row)
    return rows


def _template_prompts(tokenizer) -> list[tuple[str, Prompt]]:
    """(question, prompt) for each of PROMPTS as the model is asked it: through loraforge's template
    when it wrote the chat template (the render training used), else through the tokenizer's Jinja."""
    from loraforge.data.records import Turn
    from loraforge.data.templates import get_template, template_name_in
    from loraforge.infer.engine import turns_prompt

    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not chat_template:
        return []
    name = template_name_in(chat_template)
    if name is None:
        return [(p, tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True)) for p in PROMPTS]
    template = get_template(name)
    return [(p, turns_prompt(template, None, [Turn("user", p)], tokenizer.eos_token or "", tokenizer.bos_token or ""))
            for p in PROMPTS]


def _judge(tokens: list[dict], overall: dict, limits: Limits) -> list[str]:
    problems = []
    if not all(t["match"] for t in tokens):
        first = next(t for t in tokens if not t["match"])
        problems.append(f"{sum(not t['match'] for t in tokens)} of {len(tokens)} strings tokenize differently "
                        f"(first: {first['text'][:20]!r} at token {first['first_difference']}: "
                        f"gguf {first['gguf_pieces']} vs transformers {first['hf_pieces']})")
    if limits.min_top1 is not None and overall["top1_decisive"] < limits.min_top1:
        problems.append(f"top-1 agreement {overall['top1_decisive']:.1%} (where the reference is not a near-tie) "
                        f"< {limits.min_top1:.0%} expected for a {limits.tier} file")
    if limits.max_kl is not None and overall["kl_mean"] > limits.max_kl:
        problems.append(f"mean KL {overall['kl_mean']:.3g} > {limits.max_kl:g} expected for a {limits.tier} file")
    return problems


def _aggregate(logits: list[dict]) -> dict:
    positions = sum(r["positions"] for r in logits)
    decisive = sum(r["decisive_positions"] for r in logits)
    return {"positions": positions, "top1": sum(r["top1"] * r["positions"] for r in logits) / positions,
            "decisive_positions": decisive,
            # no decisive position at all (a random model's flat logits): nothing for top-1 to judge
            "top1_decisive": sum(r["top1_decisive"] * r["decisive_positions"] for r in logits) / decisive
            if decisive else 1.0,
            "kl_mean": sum(r["kl_mean"] * r["positions"] for r in logits) / positions,
            "kl_max": max(r["kl_max"] for r in logits), "max_abs_diff": max(r["max_abs_diff"] for r in logits)}


def _versions() -> dict:
    from loraforge import __version__
    from loraforge.env import package_version

    return {"loraforge": __version__, **{package: package_version(package) for package in
                                         ("llama_cpp_python", "transformers", "peft", "torch", "gguf")}}


def _write_json(report: dict, path: Path) -> None:
    write_text(path, json.dumps(report, ensure_ascii=False, indent=2))


def verify_export(gguf_path: Path, base_dir: Path, adapter_dirs: list[Path], report_path: Path) -> dict:
    """Compare `gguf_path` under llama.cpp with base + adapters under transformers/peft; write
    `report_path` (JSON) and return the report, or raise ParityFailed after writing it."""
    import llama_cpp

    from loraforge.tokenizer import chain_tokenizer_dir

    gguf_path, base_dir, report_path = Path(gguf_path), Path(base_dir), Path(report_path)
    adapter_dirs = [Path(a) for a in adapter_dirs]
    # the tokenizer training used, loaded as training loads it: llama.cpp's ids must be its ids
    source = chain_tokenizer_dir(base_dir, adapter_dirs)
    tokenizer = load_chain_tokenizer(base_dir, adapter_dirs)
    rendered = _template_prompts(tokenizer)
    # (label, text): three probes and the chat prompts (the bare questions if there is no template)
    cases = [(t, t) for t in PROBES[:3]] + ([(f"[chat] {q}", t) for q, t in rendered] or [(p, p) for p in PROMPTS])
    longest = max(len(hf_prompt_ids(tokenizer, t)) for t in PROBES + TOKENIZER_PROBES + [t for _, t in cases])
    threads = usable_cpus()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=longest + GENERATED_TOKENS + 8, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        raw_type = llm.metadata.get("general.file_type")
        file_type = int(raw_type) if raw_type is not None else -1
        limits = limits_for(file_type)
        model = reference_model(base_dir, adapter_dirs)
        report = {"file": str(gguf_path), "file_type": file_type, "file_type_name": file_type_name(file_type),
                  "tier": limits.tier, "base": str(base_dir), "adapters": [str(a) for a in adapter_dirs],
                  "tokenizer": str(source),
                  "thresholds": {"top1_decisive": limits.min_top1, "kl_mean": limits.max_kl,
                                 "decisive_margin": DECISIVE_MARGIN},
                  "versions": _versions()}
        vocab = (llm.n_vocab(), model.get_output_embeddings().weight.shape[0])
        if vocab[0] != vocab[1]:
            report.update(verdict="FAIL", problems=[f"the GGUF has {vocab[0]} tokens, base + adapters {vocab[1]}"])
            _fail(report, report_path)
        report["tokenization"] = _tokenization(llm, tokenizer, PROBES + TOKENIZER_PROBES + [t for _, t in rendered])
        report.update(_compare(llm, model, tokenizer, cases))
    finally:
        llm.close()

    report["overall"] = _aggregate(report["logits"])
    problems = _judge(report["tokenization"], report["overall"], limits)
    report.update(verdict="FAIL" if problems else "PASS", problems=problems)
    if problems:
        _fail(report, report_path)
    _write_json(report, report_path)
    return report


def _compare(llm, model, tokenizer, cases: list[tuple[str, Prompt]]) -> dict:
    """Logits at every position of each case; greedy continuations of the last two (the chat prompts)."""
    from tqdm import tqdm

    stop = {t for t in (tokenizer.eos_token_id,) if t is not None}
    generate = cases[-2:]
    logits, generation = [], []
    with tqdm(total=len(cases) + 2 * len(generate), desc="verify", unit="check") as progress:
        for label, text in cases:
            ids = hf_prompt_ids(tokenizer, text)
            logits.append({"label": label, "text": prompt_text(text),
                           **compare_logits(_gguf_logits(llm, ids), _hf_logits(model, ids))})
            progress.update()
        for label, text in generate:
            ids = hf_prompt_ids(tokenizer, text)
            hf = _greedy_hf(model, ids, GENERATED_TOKENS, stop)
            progress.update()
            ours = _greedy_gguf(llm, ids, GENERATED_TOKENS, stop)
            progress.update()
            same = next((i for i, (a, b) in enumerate(zip(hf, ours)) if a != b), min(len(hf), len(ours)))
            generation.append({"label": label, "prompt": prompt_text(text), "identical": hf == ours, "common_prefix": same,
                               "tokens": max(len(hf), len(ours)), "hf_ids": hf, "gguf_ids": ours,
                               "hf": tokenizer.decode(hf, skip_special_tokens=True),
                               "gguf": tokenizer.decode(ours, skip_special_tokens=True)})
    return {"logits": logits, "generation": generation}


def _fail(report: dict, report_path: Path) -> None:
    _write_json(report, report_path)
    problems = report["problems"]
    if any(p.startswith("the GGUF has") for p in problems):
        cause = "the GGUF was exported from another base or other adapters (an extended vocabulary?)"
    elif any("tokenize differently" in p for p in problems):
        cause = ("llama.cpp cuts text unlike tokenizer.json: the GGUF's vocabulary, merges or pre-tokenizer "
                 "(tokenizer.ggml.*) are not the tokenizer's")
    else:
        cause = "was it exported from other adapters, adapters in another order, or another base?"
    # the table ends with the verdict and its reasons; without one (no logits compared) say them here
    details = f"\n{format_parity(report)}" if "logits" in report else f": {'; '.join(problems)}"
    raise ParityFailed(f"{report['file']} does not answer like base + adapters{details}\n"
                       f"{cause} — full report: {report_path}", report)


def _fit(text: str, width: int) -> str:
    """`text` cut and padded to `width` terminal columns (CJK characters take two)."""
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
    adapters = len(report["adapters"])
    lines = [f"{report['file_type_name']} ({report['tier']}) under llama.cpp vs transformers fp32"
             + (f" + {adapters} adapter{'s' if adapters > 1 else ''} through peft" if adapters else ""),
             f"{'prompt':<34} {'tokens':>6} {'top-1':>7} {'mean KL':>10} {'max |Δ|':>9}"]
    o = report["overall"]
    for row in [*report["logits"], {"label": "all", **o}]:
        text = _fit(row["label"].replace("\n", "⏎"), 34)
        lines.append(f"{text} {row['positions']:>6} {row['top1']:>7.1%} {row['kl_mean']:>10.2e} "
                     f"{row['max_abs_diff']:>9.4f}")
    tokens, gen = report["tokenization"], report["generation"]
    lines.append(f"tokenization: {sum(t['match'] for t in tokens)}/{len(tokens)} strings identical")
    lines.append(f"greedy generation: {sum(g['identical'] for g in gen)}/{len(gen)} identical over "
                 f"{GENERATED_TOKENS} tokens" + "".join(f" (prompt {i}: same for {g['common_prefix']})"
                                                        for i, g in enumerate(gen, 1) if not g["identical"]))
    if report["problems"]:
        reason = "; ".join(report["problems"])
    else:
        t = report["thresholds"]
        if t["top1_decisive"] is None and t["kl_mean"] is None:
            judged = "logits reported, not judged; tokenization identical"
        elif t["top1_decisive"] is None:
            judged = f"mean KL ≤ {t['kl_mean']:g} (top-1 reported, not judged)"
        else:
            judged = (f"top-1 ≥ {t['top1_decisive']:.0%} where not a near-tie ({o['top1_decisive']:.1%}), "
                      f"mean KL ≤ {t['kl_mean']:g}")
        reason = f"{report['tier']} file: {judged}"
    lines.append(f"{report['verdict']}: {reason}")
    return "\n".join(lines)
