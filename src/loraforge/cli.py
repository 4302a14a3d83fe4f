"""The `loraforge` command: a table of subcommands, each one typed function.

The functions live in their modules and return values; this file only parses
arguments, prints results and turns a LoraforgeError into a message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from loraforge import __version__
from loraforge.errors import LoraforgeError


def cmd_version(args) -> None:
    print(__version__)


def cmd_env(args) -> None:
    from loraforge.env import environment

    info = environment()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def _print_notes(notes: list[str]) -> None:
    """One line per LLaMA-Factory key that means nothing here, so the user knows it was read."""
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


def _config(args):
    from loraforge.config import read_config

    config, notes = read_config(args.config, args.overrides)
    _print_notes(notes)
    return config


def cmd_data_check(args) -> None:
    from loraforge.data.check import check_data, format_report

    report = check_data(_config(args))
    print(format_report(report))


def cmd_train(args) -> None:
    from loraforge.train.run import train

    config = _config(args)
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f"loss {result.first_loss:.4f} → {result.last_loss:.4f}" if result.first_loss is not None else ""
        print(f"trained {result.steps} steps on {result.train_examples} examples; {loss}")
        if result.eval_loss is not None:
            print(f"eval loss {result.eval_loss:.4f}")
        print(f"run directory: {result.output_dir}  (loss curve: {result.output_dir / 'loss.png'})")


def _adapters(args) -> list[Path]:
    return [Path(a) for a in args.adapter.split(",") if a]


def _base_and_adapters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model dir (safetensors or pytorch_model*.bin shards, or Meta consolidated.*.pth + params.json)")
    parser.add_argument("--adapter", default="", help="adapter dirs in training order: pt first, then sft (A1,A2)")


def _from_lf_yaml(args, path: str, command: str) -> None:
    """Fill the arguments not given on the command line from a LLaMA-Factory merge/inference YAML."""
    from loraforge.config_lf import read_lf_command

    values, notes = read_lf_command(path, command)
    _print_notes(notes)
    for dest, value in values.items():
        if getattr(args, dest, None) in (None, "", "auto"):
            setattr(args, dest, value)


def _is_yaml(path: str | None) -> bool:
    return bool(path) and Path(path).suffix.lower() in (".yaml", ".yml")


def cmd_merge(args) -> None:
    if args.config:
        _from_lf_yaml(args, args.config, "merge")
    missing = [flag for flag, value in (("--base", args.base), ("-o/--output", args.output)) if not value]
    if missing:
        raise LoraforgeError(f"merge needs {' and '.join(missing)} (or a LLaMA-Factory merge_lora YAML with "
                             "model_name_or_path and export_dir: loraforge merge FILE.yaml)")
    args.max_shard_gb = 5.0 if args.max_shard_gb is None else float(args.max_shard_gb)
    adapters = _adapters(args)
    if args.format == "pth":
        from loraforge.export.pth import merge_to_pth

        out = merge_to_pth(Path(args.base), adapters, Path(args.output), force=args.force)
    else:
        from loraforge.export.hf import merge_to_hf

        out = merge_to_hf(Path(args.base), adapters, Path(args.output), int(args.max_shard_gb * 1024**3),
                          force=args.force)
    print(f"merged {len(adapters)} adapter(s) into {args.base}: {out}")


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, metavar="LF_MERGE.yaml",
                        help="a LLaMA-Factory merge_lora YAML (model_name_or_path, adapter_name_or_path, export_dir, "
                             "export_size); flags given as well win")
    parser.add_argument("--base", default=None, help="base model dir (safetensors or pytorch_model*.bin shards, "
                                                     "or Meta consolidated.*.pth + params.json)")
    parser.add_argument("--adapter", default="", help="adapter dirs in training order: pt first, then sft (A1,A2)")
    parser.add_argument("-o", "--output", default=None, help="new directory for the merged model")
    parser.add_argument("--format", choices=["hf", "pth"], default="hf",
                        help="hf: sharded safetensors + config + tokenizer; pth: Meta consolidated.00.pth + params.json")
    parser.add_argument("--max-shard-gb", type=float, default=None,
                        help="largest safetensors shard, in GiB (hf; default 5)")
    _force_argument(parser)


def _force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="go on when the adapter chain is not the one the adapters' records say they were "
                             "trained on (a note says what was expected)")


def cmd_export_gguf(args) -> None:
    from loraforge.export.gguf_writer import export_gguf

    adapters = _adapters(args)
    imatrix = Path(args.imatrix) if args.imatrix else None
    out = export_gguf(Path(args.base), adapters, Path(args.output), args.quant, imatrix=imatrix,
                      force=args.force, template=args.template or None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.quant})")
    if args.verify:
        from loraforge.eval.parity import format_parity, verify_export

        report_path = out.with_name(out.stem + ".parity.json")
        report = verify_export(out, Path(args.base), adapters, report_path)
        print(format_parity(report))
        print(f"parity report: {report_path}")


def _export_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.export.schemes import SCHEMES

    _base_and_adapters(parser)
    parser.add_argument("--quant", default="f16", help=f"one of: {', '.join(SCHEMES)}")
    parser.add_argument("--imatrix", default="", help="llama.cpp importance matrix (imatrix.gguf or legacy .dat)")
    parser.add_argument("--verify", action="store_true",
                        help="compare tokens and logits with transformers + peft; writes <output>.parity.json")
    parser.add_argument("--template", default="", metavar="NAME|FILE",
                        help="chat template to embed (a template name or a Jinja file; default: the tokenizer's)")
    _force_argument(parser)
    parser.add_argument("-o", "--output", required=True, help="the .gguf file to write")


def cmd_export_lora_gguf(args) -> None:
    from loraforge.export.lora_gguf import export_lora_gguf

    out = export_lora_gguf(Path(args.adapter), Path(args.output), Path(args.base) if args.base else None,
                           force=args.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, llama.cpp LoRA adapter)")


def _export_lora_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a peft LoRA adapter dir")
    parser.add_argument("--base", default="", help="its base model dir (default: the adapter's base_model_name_or_path)")
    _force_argument(parser)
    parser.add_argument("-o", "--output", required=True, help="the adapter .gguf file to write")


def cmd_export_ollama(args) -> None:
    from loraforge.export.ollama import write_modelfile

    out = write_modelfile(Path(args.gguf), Path(args.output) if args.output else None,
                          system=args.system, template=args.template or None)
    print(f"wrote {out}; next: ollama create NAME -f {out}")


def _export_ollama_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="the exported .gguf model")
    parser.add_argument("-o", "--output", default="", help="Modelfile path (default: Modelfile next to the GGUF)")
    parser.add_argument("--system", default=None, help="SYSTEM prompt (default: the template's own, if any)")
    parser.add_argument("--template", default="", help="chat template name (default: read from the GGUF)")


def cmd_gguf_inspect(args) -> None:
    from loraforge.export.inspect import describe_gguf

    print(describe_gguf(Path(args.file)))


def _gguf_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .gguf file")


def cmd_vocab_train(args) -> None:
    from loraforge.vocab.train import train_vocab

    result = train_vocab([Path(p) for p in args.corpus], Path(args.output), args.vocab_size, args.model_type,
                         args.max_sentences)
    print(result.describe())


def _vocab_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one paragraph a line")
    parser.add_argument("--vocab-size", type=int, default=20000, help="pieces in the new model (Chinese-LLaMA: 20000)")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="bpe, like LLaMA's")
    parser.add_argument("--max-sentences", type=int, default=0, help="sample this many lines of a big corpus (0: all)")
    parser.add_argument("-o", "--output", required=True, help="the .model file to write, e.g. zh.model")


def cmd_vocab_merge(args) -> None:
    from loraforge.vocab.merge import merge_vocab

    print(merge_vocab(Path(args.base), Path(args.add), Path(args.output), args.pad_token or None,
                      args.scheme).describe())


def _vocab_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model or tokenizer dir with tokenizer.model (or the file)")
    parser.add_argument("--add", required=True, help="SentencePiece model whose new pieces are appended (vocab train)")
    parser.add_argument("--pad-token", default="", help="add this pad token after the pieces, e.g. [PAD] (Chinese-Alpaca)")
    parser.add_argument("--scheme", choices=["chinese-llama", "ranked"], default="chinese-llama",
                        help="scores of the new pieces: 0, as Chinese-LLaMA's recipe (default), or ranked below the "
                             "base's (an exact tokenizer.json for other tools)")
    parser.add_argument("-o", "--output", required=True, help="new directory for the merged tokenizer")


def cmd_vocab_report(args) -> None:
    from loraforge.vocab.report import format_report, vocab_report

    print(format_report(vocab_report(Path(args.base), Path(args.new), Path(args.text),
                                     Path(args.output) if args.output else None)))


def _vocab_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base tokenizer (or model) dir")
    parser.add_argument("--new", required=True, help="the extended tokenizer dir (vocab merge -o)")
    parser.add_argument("--text", required=True, help="held-out text to measure on")
    parser.add_argument("-o", "--output", default="", help="where vocab_report.json/.png go (default: --new)")


def cmd_vocab_resize(args) -> None:
    from loraforge.vocab.resize import resize_model

    result = resize_model(Path(args.model), Path(args.tokenizer), Path(args.output), args.pad_to or None)
    print(f"{args.output}: {result.describe()}")


def _vocab_resize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model dir")
    parser.add_argument("--tokenizer", required=True, help="the extended tokenizer dir (vocab merge -o)")
    parser.add_argument("--pad-to", type=int, default=0, help="round the rows up to a multiple, e.g. 64 (0: none)")
    parser.add_argument("-o", "--output", required=True, help="new directory for the resized model")


def cmd_chat(args) -> None:
    from loraforge.infer.chat import run_chat
    from loraforge.infer.options import engine_from, generation_config

    if _is_yaml(args.model):  # LLaMA-Factory's `llamafactory-cli chat inference.yaml`
        path, args.model = args.model, None
        _from_lf_yaml(args, path, "chat")
        if not args.model:
            raise LoraforgeError(f"{path}: model_name_or_path is not set (the model to chat with)")
    config = generation_config(args)
    engine = engine_from(args)
    try:
        run_chat(engine, config, system=args.system)
    finally:
        engine.close()


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.infer.options import add_generation_arguments, add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    add_generation_arguments(parser)


def cmd_generate(args) -> None:
    from loraforge.infer.generate import generate_file, read_requests
    from loraforge.infer.options import engine_from, generation_config

    config = generation_config(args)
    read_requests(Path(args.input))  # a bad line fails before the model loads
    engine = engine_from(args)
    try:
        done = generate_file(engine, Path(args.input), Path(args.output), config)
    finally:
        engine.close()
    print(f"wrote {done.requests} predictions to {done.output} ({done.completion_tokens} tokens in "
          f"{done.seconds:.1f} s); generation parameters: {done.config_path}")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.infer.options import add_generation_arguments, add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--input", required=True,
                        help="jsonl: one instruction/input, messages, conversations or prompt object per line")
    parser.add_argument("-o", "--output", required=True, help="predictions jsonl to write")
    add_generation_arguments(parser)


def cmd_eval_generate(args) -> None:
    from loraforge.eval.generate import run_from_args, seconds_per_100

    result = run_from_args(args)
    n = len(result.data.examples)
    print(f"{result.data.description}; template {result.data.template or 'each model’s own'}")
    print(result.table)
    for model in result.models:
        print(f"{model.label}: {model.seconds:.1f} s ({seconds_per_100(model, n):.1f} s per 100 examples, "
              f"{model.engine}), predictions: {result.out_dir / model.predictions}")
    print(f"wrote {result.out_dir / 'eval.json'} and {result.out_dir / 'eval.md'}")


def _eval_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.eval.generate import add_eval_generate_arguments

    add_eval_generate_arguments(parser)


def _scoring_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a HF model dir, an adapter dir (its base is loaded) or a .gguf file")
    parser.add_argument("--engine", choices=["auto", "llamacpp", "hf"], default="auto",
                        help="auto: llama.cpp for .gguf, transformers (+peft) for directories")
    parser.add_argument("--base", default=None, help="base model dir of an adapter (default: its adapter_config.json's)")
    parser.add_argument("--adapter", default="", help="more adapters on top, comma-separated (peft dirs; "
                                                      "one llama.cpp adapter .gguf for a .gguf model)")
    parser.add_argument("--device", default=None, help="transformers engine: cpu or cuda (default: cuda if present)")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="new folder for eval.json + eval.md (default: beside the model, MODEL.eval-ppl / .eval-choice)")


def _adapters(args) -> list[str]:
    return [a for a in (args.adapter or "").split(",") if a]


def cmd_eval_ppl(args) -> None:
    from loraforge.eval.ppl import format_perplexity, perplexity

    out_dir = _eval_out_dir(args, "ppl")
    report = perplexity(args.model, Path(args.text), args.window, args.stride, args.engine, _adapters(args),
                        args.base, args.device)
    _write_eval(report, out_dir, format_perplexity(report))


def _eval_out_dir(args, kind: str) -> Path:
    """-o, or the folder beside the model; refused if it holds anything, before the model loads."""
    from loraforge.eval.ppl import default_out_dir
    from loraforge.outputs import check_new_dir

    out_dir = Path(args.output) if args.output else default_out_dir(args.model, kind)
    check_new_dir(out_dir)
    return out_dir


def _write_eval(report: dict, out_dir: Path, markdown: str) -> None:
    from loraforge.eval.ppl import write_report

    json_path, _ = write_report(report, out_dir, markdown)
    print(markdown.strip())
    print(f"wrote {json_path} and eval.md beside it")


def _eval_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    _scoring_model_arguments(parser)
    parser.add_argument("--text", required=True, help="UTF-8 text file (held-out text), scored as one text")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per window (default 512, or the model's context if shorter)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default half the window); each token is scored once")


def cmd_eval_choice(args) -> None:
    from loraforge.eval.choice import evaluate_choice, format_choice

    out_dir = _eval_out_dir(args, "choice")
    subjects = [s for s in (args.subjects or "").split(",") if s]
    report = evaluate_choice(args.model, Path(args.data), args.k, args.split, subjects, args.engine,
                             _adapters(args), args.base, args.n_ctx, args.device, args.limit)
    _write_eval(report, out_dir, format_choice(report))


def _eval_choice_arguments(parser: argparse.ArgumentParser) -> None:
    _scoring_model_arguments(parser)
    parser.add_argument("--data", required=True, help="C-Eval or CMMLU data folder (one CSV per subject and split)")
    parser.add_argument("-k", type=int, default=0, help="few-shot examples from dev/ (default 0: zero-shot)")
    parser.add_argument("--split", default=None,
                        help="val, test or dev (default: val where there is one, as C-Eval; else test, as CMMLU)")
    parser.add_argument("--subjects", default="", help="comma-separated subjects (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    parser.add_argument("--n-ctx", type=int, default=None, help="llama.cpp context (default: the model's)")


def _config_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. lora.r=16 train.lr=2e-4")


def cmd_serve(args) -> None:
    from loraforge.serve.server import ServeOptions, parse_adapters, serve

    if _is_yaml(args.model):
        raise LoraforgeError(_serve_command_for(args.model))
    options = ServeOptions(Path(args.model), parse_adapters(args.adapter), args.name or None, args.host, args.port,
                           args.api_key or None, args.parallel, args.ctx_size or None, args.threads or None,
                           chat_template=args.chat_template or None)

    def ready(url: str, names: list[str]) -> None:
        print(f"serving {', '.join(names)} at {url}/v1 (chat page: {url}/; Ctrl-C stops)", flush=True)

    serve(options, ready)


def _serve_command_for(path: str) -> str:
    """LLaMA-Factory's `api inference.yaml` serves base + adapter as one model; loraforge serves a model path."""
    from loraforge.config_lf import read_lf_command

    values, _ = read_lf_command(path, "chat")
    adapters = [a for a in str(values.get("adapter") or "").split(",") if a]
    model = adapters[0] if len(adapters) == 1 else values.get("model", "MODEL")
    template = f" --chat-template {values['template']}" if values.get("template") else ""
    how = (" (an adapter dir serves on its own base, read from its adapter_config.json; or merge first: "
           "loraforge merge FILE.yaml)" if adapters else "")
    return (f"{path} is a LLaMA-Factory inference YAML; `loraforge serve` takes the model itself: "
            f"loraforge serve {model}{template}{how}")


def cmd_board(args) -> None:
    from loraforge.board.app import serve_board

    serve_board(args.root, args.host, args.port, args.token or None)


def _board_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", action="append", default=[], metavar="DIR",
                        help="a folder the board may see (repeatable; default: the current one). Paths in a "
                             "config are relative to the first, and runs are started there")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860, as LlamaBoard)")
    parser.add_argument("--token", default="", help="required with a --host other than loopback: every request "
                                                   "must send it (Authorization: Bearer T, or ?token=T)")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .gguf model to serve (a HF model or adapter dir: one request at a time)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA served as model NAME (repeatable): an adapter .gguf for a GGUF model, "
                             "a peft dir for a HF one")
    parser.add_argument("--name", default="", help="the base model's id in /v1/models (default: the file stem)")
    parser.add_argument("--chat-template", default="", metavar="NAME|FILE",
                        help="chat template (a template name or a Jinja file): replaces the model's own, and "
                             "serves adapters that carry none (an adapter .gguf's own template wins for its name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--api-key", default="", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="requests decoded together per model (slots; default: 4)")
    parser.add_argument("--ctx-size", type=int, default=0,
                        help="tokens per slot, prompt + answer (default: the model's trained context)")
    parser.add_argument("--threads", type=int, default=0,
                        help="the most llama.cpp threads (default: every usable CPU; fewer while other processes keep cores busy)")


def cmd_eval_quant(args) -> None:
    from loraforge.eval.quant_quality import evaluate_quants, format_quant_table

    result = evaluate_quants(args.model, Path(args.text), [q for q in args.quants.split(",") if q], _adapters(args),
                             Path(args.imatrix) if args.imatrix else None,
                             Path(args.output) if args.output else None, Path(args.keep) if args.keep else None,
                             args.max_kl, args.ctx, args.chunks, args.reference)
    print(format_quant_table(result.report).strip())
    print(f"wrote {result.json_path}, eval.md and {result.png_path.name} beside it")


def _eval_quant_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.eval.quant_quality import DEFAULT_MAX_KL, DEFAULT_QUANTS

    parser.add_argument("model", help="the HF base model dir (or an adapter dir) to export at each type")
    parser.add_argument("--adapter", default="", help="adapter dirs applied on top, in training order (A1,A2)")
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="comma-separated quantization types")
    parser.add_argument("--text", required=True, help="UTF-8 held-out text to measure on")
    parser.add_argument("--imatrix", default="", help="importance matrix for every export (loraforge export imatrix)")
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                        help=f"KL budget in nats for the recommendation (default {DEFAULT_MAX_KL})")
    parser.add_argument("--reference", choices=["f16", "f32"], default="f16", help="what KL is measured against")
    parser.add_argument("--ctx", type=int, default=None, help="tokens per chunk (default 512 or the model's context)")
    parser.add_argument("--chunks", type=int, default=0, help="score at most this many chunks (0: all)")
    parser.add_argument("--keep", default="", metavar="DIR", help="keep the exported GGUFs in this new folder")
    parser.add_argument("-o", "--output", default="", help="folder for eval.json, eval.md, kl_vs_size.png "
                                                          "(default: MODEL.eval-quant beside the model)")


def cmd_export_imatrix(args) -> None:
    from loraforge.export.imatrix_compute import compute_imatrix

    result = compute_imatrix(args.model, Path(args.text), Path(args.output), _adapters(args), args.ctx, args.chunks,
                             args.process_output)
    print(f"wrote {result.path}: {result.entries} tensors, {result.chunks} chunks of {result.chunk_size} tokens "
          f"({result.seconds:.1f} s); use it with: loraforge export gguf ... --imatrix {result.path}")


def cmd_score(args) -> None:
    from loraforge.train.preference import score_file

    names = [name for name in args.data.split(",") if name]
    print(score_file(Path(args.run), names, Path(args.data_dir) if args.data_dir else None, Path(args.output)))


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a stage rm run directory (its adapter or full weights, and loraforge.yaml)")
    parser.add_argument("--data", required=True,
                        help="data files or dataset_info.json names, comma-separated: chosen/rejected pairs "
                             "(both answers scored) or conversations (the last answer scored)")
    parser.add_argument("--data-dir", default=None, help="the folder with dataset_info.json (for names)")
    parser.add_argument("-o", "--output", required=True, help="scores jsonl to write, one line per record")


def _export_imatrix_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.export.imatrix_compute import DEFAULT_CHUNK

    parser.add_argument("model", help="the HF base model dir (or an adapter dir)")
    parser.add_argument("--adapter", default="", help="adapter dirs merged on top, in training order (A1,A2)")
    parser.add_argument("--text", required=True, help="UTF-8 calibration text, ideally like the data the model sees")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CHUNK, help=f"tokens per chunk (default {DEFAULT_CHUNK})")
    parser.add_argument("--chunks", type=int, default=0, help="use at most this many chunks (0: all)")
    parser.add_argument("--process-output", action="store_true",
                        help="collect output.weight too (off, as in llama-imatrix)")
    parser.add_argument("-o", "--output", required=True, help="the imatrix .gguf to write")


# (words, function, help, how to add arguments)
COMMANDS: list[tuple[tuple[str, ...], Callable, str, Callable | None]] = [
    (("version",), cmd_version, "print the loraforge version", None),
    (("env",), cmd_env, "versions of torch, transformers, peft, llama-cpp-python; CUDA or not", None),
    (("data", "check"), cmd_data_check,
     "formats, counts, one rendered example with learned spans, token lengths", _config_command),
    (("train",), cmd_train, "LoRA / full / prompt-method training (a loraforge or LLaMA-Factory YAML)",
     _config_command),
    (("vocab", "train"), cmd_vocab_train, "train a SentencePiece model with llama.cpp-safe settings",
     _vocab_train_arguments),
    (("vocab", "merge"), cmd_vocab_merge, "append a SentencePiece model's new pieces to a base tokenizer",
     _vocab_merge_arguments),
    (("vocab", "report"), cmd_vocab_report, "tokens per Chinese character / English word before and after, chart",
     _vocab_report_arguments),
    (("vocab", "resize"), cmd_vocab_resize, "grow embed_tokens and lm_head to an extended tokenizer",
     _vocab_resize_arguments),
    (("export", "gguf"), cmd_export_gguf, "base + adapters → one GGUF file in one streaming pass", _export_gguf_arguments),
    (("export", "lora-gguf"), cmd_export_lora_gguf, "a peft LoRA adapter → llama.cpp's GGUF adapter format",
     _export_lora_gguf_arguments),
    (("export", "imatrix"), cmd_export_imatrix,
     "importance matrix from your own text (llama-imatrix's format, no llama.cpp binary)", _export_imatrix_arguments),
    (("export", "ollama"), cmd_export_ollama, "an Ollama Modelfile next to an exported GGUF", _export_ollama_arguments),
    (("merge",), cmd_merge, "merge LoRA adapters into the base, streamed tensor by tensor (or: merge LF_MERGE.yaml)",
     _merge_arguments),
    (("chat",), cmd_chat, "chat with a model in the terminal, streamed (/system, /clear, /history, /exit); "
     "MODEL may be a LLaMA-Factory inference YAML",
     _chat_arguments),
    (("generate",), cmd_generate, "batch generation over a jsonl file, with a progress bar", _generate_arguments),
    (("gguf", "inspect"), cmd_gguf_inspect, "metadata, tensor count by type, size and bits per weight of a GGUF",
     _gguf_inspect_arguments),
    # eval: one subcommand per measurement, each writing eval.json + eval.md
    (("eval", "generate"), cmd_eval_generate,
     "generate on an SFT dataset's prompts: BLEU-4, ROUGE-1/2/L, exact match, length, BERTScore; --compare",
     _eval_generate_arguments),
    (("eval", "ppl"), cmd_eval_ppl,
     "perplexity of a text file in strided windows (transformers' rule), HF or GGUF", _eval_ppl_arguments),
    (("eval", "choice"), cmd_eval_choice,
     "C-Eval/CMMLU multiple choice by next-token letter logits, zero- or k-shot, per subject", _eval_choice_arguments),
    (("eval", "quant"), cmd_eval_quant,
     "per quant type: size, bpw, perplexity, KL vs F16 (mean, p99), top-1, tokens/s; plot; recommendation",
     _eval_quant_arguments),
    (("score",), cmd_score, "rewards from a reward model run (stage rm) for pairs or answers in data files",
     _score_arguments),
    (("board",), cmd_board, "the training workflow in a browser: pick, train with a live loss chart, stop, resume",
     _board_arguments),
    (("serve",), cmd_serve, "OpenAI-compatible server with continuous batching, LoRA adapters by name, chat page",
     _serve_arguments),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, func, help_text, add_args in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        if add_args:
            add_args(sub)
        sub.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LoraforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
