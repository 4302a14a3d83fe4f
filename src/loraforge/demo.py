"""`make demo`: the pt → sft path a real user runs, on the bundled example, on a CPU.

No base model may be downloaded, so the demo makes one: a SentencePiece tokenizer
trained on the bundled Chinese corpus, and a small LLaMA pre-trained from scratch on
that corpus (full training, cached under .cache/demo so a second run skips it). Then
LoRA instruction tuning on the bundled Alpaca-style records, and a look at what the
model learned: the loss curve and greedy answers to training questions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from loraforge.config import load_config
from loraforge.data.dataset import load_reports, resolve_specs
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.inspect import describe_gguf
from loraforge.export.ollama import write_modelfile
from loraforge.infer.hf import exact_matches, load_model, template_of
from loraforge.infer.llamacpp import greedy_answer_gguf, load_gguf
from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model
from loraforge.train.run import train

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CACHE = ROOT / ".cache" / "demo"
DEMO_SHAPE = TinyShape(hidden=256, layers=4, heads=8, kv_heads=4, ffn=640, max_positions=512)
VOCAB = 2000


def _fingerprint() -> str:
    digest = hashlib.sha256((EXAMPLES / "data" / "zh_corpus.txt").read_bytes())
    digest.update(repr((DEMO_SHAPE, VOCAB)).encode())
    digest.update((EXAMPLES / "configs" / "demo-pt.yaml").read_bytes())
    return digest.hexdigest()[:16]


def demo_base() -> Path:
    """The pre-trained demo base model, built once and cached."""
    base = CACHE / "base"
    stamp = base / "demo.stamp"
    if stamp.exists() and stamp.read_text() == _fingerprint():
        print(f"base model: {base} (cached)")
        return base
    shutil.rmtree(CACHE, ignore_errors=True)
    print("building the demo base model: tokenizer → random tiny LLaMA → pre-training on zh_corpus.txt")
    tok_dir = build_spm_tokenizer([EXAMPLES / "data" / "zh_corpus.txt"], CACHE / "tokenizer", VOCAB)
    init = build_tiny_model(tok_dir, CACHE / "init", DEMO_SHAPE)
    config = load_config(EXAMPLES / "configs" / "demo-pt.yaml",
                         [f"model.path={init}", f"train.output_dir={base}", "train.overwrite_output_dir=true"])
    result = train(config)
    print(f"pre-training: loss {result.first_loss:.3f} → {result.last_loss:.3f} in {result.steps} steps")
    shutil.rmtree(init)
    stamp.write_text(_fingerprint())
    return base


def serve_once(gguf_path: Path, question: str) -> str:
    """Start `loraforge serve` on the GGUF, ask one greedy question with the openai client, stop."""
    from openai import OpenAI

    from loraforge.serve.server import ServeOptions, background_server

    with background_server(ServeOptions(gguf_path, port=0, parallel=2)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=gguf_path.stem, messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=64)
    return reply.choices[0].message.content


def main() -> None:
    start = time.perf_counter()
    base = demo_base()
    run_dir = ROOT / "runs" / "demo-sft"
    config = load_config(EXAMPLES / "configs" / "demo-sft.yaml",
                         [f"model.path={base}", f"train.output_dir={run_dir}", "train.overwrite_output_dir=true"])
    print(f"\nLoRA instruction tuning on {', '.join(config.data.datasets)} (template {config.data.template})")
    result = train(config)
    print(f"\nSFT: loss {result.first_loss:.3f} → {result.last_loss:.3f} in {result.steps} steps; "
          f"run directory {run_dir}; loss curve {run_dir / 'loss.png'}")

    model, tokenizer = load_model(run_dir)
    records = [r for rep in load_reports(config, resolve_specs(config)) for r in rep.records if len(r.turns) == 2]
    rows = exact_matches(model, tokenizer, template_of(run_dir), records)
    exact = [row for row in rows if row[1].strip() == row[2].strip()]
    shown = (exact + [row for row in rows if row not in exact])[:6]
    print(f"\nwhat it learned: greedy answers to {len(rows)} trained questions, {len(exact)} word for word")
    for question, expected, got in shown:
        mark = "✓" if got.strip() == expected.strip() else "·"
        print(f"  {mark} 问：{question[:40]}\n      训练答案：{expected[:60]}\n      模型回答：{got[:60]}")
    gguf_path = export_gguf(base, [run_dir], ROOT / "runs" / "demo-q8_0.gguf", "q8_0")
    llm = load_gguf(gguf_path)
    print(f"\nexported {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.1f} MB, Q8_0); llama.cpp answers:")
    same = 0
    for question, _expected, got in shown[:3]:
        answer = greedy_answer_gguf(llm, template_of(run_dir), question)
        same += answer.strip() == got.strip()
        print(f"  问：{question[:40]}\n      llama.cpp：{answer[:60]}")
    print(f"  {same} of 3 word for word what the trained model answered")
    q4_path = export_gguf(base, [run_dir], ROOT / "runs" / "demo-q4_k_m.gguf", "q4_k_m")
    q4 = load_gguf(q4_path)
    same_q4 = sum(greedy_answer_gguf(q4, template_of(run_dir), question).strip() == got.strip()
                  for question, _expected, got in shown[:3])
    facts = [line for line in describe_gguf(q4_path).splitlines() if line.startswith(("tensors", "bits per weight"))]
    print(f"\nQ4_K_M: {q4_path.name} ({q4_path.stat().st_size / 1e6:.1f} MB; {'; '.join(' '.join(f.split()) for f in facts)}); "
          f"{same_q4} of 3 answers word for word those of the trained model")
    modelfile = write_modelfile(gguf_path)
    print(f"Ollama: {modelfile}  →  ollama create demo -f {modelfile}")
    served = serve_once(gguf_path, shown[0][0])
    where = gguf_path.relative_to(Path.cwd()) if gguf_path.is_relative_to(Path.cwd()) else gguf_path
    print(f"\nloraforge serve, asked through the openai client: 问：{shown[0][0][:40]}\n      答：{served[:60]}\n"
          f"serve it with the chat page: loraforge serve {where}  →  http://127.0.0.1:8000/\n"
          f"or chat in the terminal:       loraforge chat {where} --temperature 0\n"
          "(a model this small answers its trained questions greedily; sampled answers wander — set the "
          "page's temperature to 0 too)")
    evaluation, quant = demo_eval(base, run_dir, gguf_path, config.data.template)
    summary = {"pt_base": str(base), "sft_loss_first": round(result.first_loss, 3),
               "sft_loss_last": round(result.last_loss, 3), "exact_answers": f"{len(exact)}/{len(rows)}",
               "gguf": str(gguf_path), "gguf_same_as_trained": f"{same}/3", "q4_k_m_same_as_trained": f"{same_q4}/3",
               "served_same_as_trained": served.strip() == shown[0][2].strip(),
               "heldout_rouge_l_tuned_vs_base": [round(m.metrics["rouge-l"], 2) for m in evaluation.models],
               "quant_recommendation": quant.report["recommendation"],
               "seconds": round(time.perf_counter() - start, 1)}
    print("\n" + json.dumps(summary, ensure_ascii=False))


def demo_eval(base: Path, run_dir: Path, gguf_path: Path, template: str):
    """The short eval the demo ends with: the tuned model (its Q8_0 GGUF, which answers as trained) against
    the demo base on questions it never saw (openai_zh_demo), and the quant report for three types."""
    from loraforge.eval.generate import ModelSpec, eval_generate, load_eval_data
    from loraforge.eval.quant_quality import evaluate_quants
    from loraforge.infer.engine import GenerationConfig

    out = ROOT / "runs" / "demo-eval"
    shutil.rmtree(out, ignore_errors=True)
    data = load_eval_data(["openai_zh_demo"], dataset_dir=str(EXAMPLES / "data"), template=template)
    print(f"\neval generate on {len(data.examples)} held-out questions (openai_zh_demo, never trained on): "
          "the tuned model against the demo base")
    evaluation = eval_generate([ModelSpec(str(gguf_path)), ModelSpec(str(base), engine="hf")], data, out,
                               GenerationConfig(temperature=0.0, max_new_tokens=64))
    print(f"{evaluation.table}\n(predictions and eval.md in {out}; a 4.4M-parameter model learns its trained "
          "answers by heart but cannot generalise to new questions, so neither column is good here — on a real "
          "base this table is the one to read)")
    quant_dir = ROOT / "runs" / "demo-quant"
    shutil.rmtree(quant_dir, ignore_errors=True)
    print("\neval quant: which quantization to ship (KL from F16 on zh_heldout.txt, llama-perplexity's rule)")
    quant = evaluate_quants(run_dir, EXAMPLES / "data" / "zh_heldout.txt", ["q8_0", "q4_k_m", "q3_k_m"],
                            out_dir=quant_dir, n_ctx=128)
    table = [line for line in quant.md_path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"{quant.report['recommendation_text']}  (table and kl_vs_size.png in {quant_dir})")
    return evaluation, quant


if __name__ == "__main__":
    main()
