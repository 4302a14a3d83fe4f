"""`loraforge eval generate MODEL [--compare MODEL2 …] --data CONFIG|DATASETS -o DIR`: did the fine-tune help?

Each model answers the prompts of an SFT dataset — greedy unless generation flags say
otherwise — and every answer is scored against the dataset's own answer (metrics.py:
BLEU-4, ROUGE-1/2/L as LLaMA-Factory computes them, exact match, length, optionally
BERTScore). The examples come from the same data rules as `train`:

- `--data config.yaml`: its `data` section (dir, datasets, template, max_samples,
  skip_invalid). With `data.val_size` set, the held-out examples training set aside —
  the same split (`data.dataset.split_eval`, `train.seed`) over the same tokenized
  examples, so records truncation dropped from training are skipped here too.
- `--data a,b` dataset names (`--dataset-dir` with a dataset_info.json) or files: every record.

The prompt is the conversation up to its last answer, rendered with one chat template for
every model so all are asked the same thing: `--template`, else the config's
`data.template`, else the first model's own (a loraforge template), else each model's own.
The output folder holds eval.json, eval.md and one predictions jsonl per model; it is
built under a temporary name and appears whole when every model is done.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import (
    BertScoreOptions,
    bert_scorer,
    bert_scores,
    check_bertscore,
    example_metrics,
    mean_metrics,
)
from loraforge.infer.engine import GenerationConfig

DEFINITION = ("BLEU-4: nltk sentence_bleu on characters, smoothing method3; ROUGE-1/2/L: rouge-chinese F on "
              "jieba-cut words; ×100, rounded to 4 places per example, averaged (LLaMA-Factory's compute_metrics); "
              "exact match: stripped texts equal")


@dataclass(frozen=True)
class EvalExample:
    source: str  # "file:line" of the record
    messages: list[dict]  # the prompt: system and the turns before the last answer
    reference: str  # the last answer


@dataclass
class EvalData:
    examples: list[EvalExample]
    description: str  # which datasets, which split
    template: str | None  # the chat template name every model is asked with (None: each model's own)


@dataclass(frozen=True)
class ModelSpec:
    reference: str
    engine: str = "auto"
    base: str | None = None
    adapters: tuple[str, ...] = ()


@dataclass
class ModelResult:
    label: str
    spec: ModelSpec
    engine: str
    predictions: Path  # relative to the output folder
    seconds: float
    completion_tokens: int
    metrics: dict[str, float]


@dataclass
class EvalResult:
    out_dir: Path
    models: list[ModelResult]
    data: EvalData
    table: str  # the side-by-side table, markdown
    bertscore: dict | None = field(default=None)


# ---------------------------------------------------------------- the examples


def _example(record, where_hint: str) -> EvalExample:
    from loraforge.data.records import Conversation
    from loraforge.data.templates import to_messages

    if not isinstance(record, Conversation):
        raise LoraforgeError(f"{record.source or where_hint}: plain text has no reference answer — "
                             "eval generate needs instruction data (alpaca, sharegpt or openai records)")
    messages = to_messages(record)
    last = messages.pop()
    if last["role"] != "assistant" or not last["content"].strip():
        raise LoraforgeError(f"{record.source}: the example has no reference answer (its last turn must be a "
                             "non-empty assistant answer) — add one or remove the record")
    return EvalExample(record.source, messages, last["content"])


def load_eval_data(data: list[str], *, dataset_dir: str | None = None, template: str | None = None,
                   split: str = "auto", skip_invalid: bool = False, limit: int | None = None) -> EvalData:
    """The examples to evaluate: from a config YAML's data section, or dataset names / files."""
    from loraforge.config import load_config
    from loraforge.data.dataset import load_reports, resolve_specs
    from loraforge.data.registry import load_datasets, resolve_datasets
    from loraforge.data.templates import get_template

    if not data:
        raise LoraforgeError("--data is empty: give a config YAML or dataset names / files")
    if template is not None:
        get_template(template)  # an unknown name fails before anything loads
    if len(data) == 1 and Path(data[0]).suffix.lower() in (".yaml", ".yml"):
        config = load_config(data[0])
        if config.stage != "sft":
            raise LoraforgeError(f"{data[0]}: stage is {config.stage}; eval generate needs an sft config "
                                 "(instruction data with answers)")
        if skip_invalid:
            config.data.skip_invalid = True
        reports = load_reports(config, resolve_specs(config))
        records = [record for report in reports for record in report.records]
        names = ", ".join(config.data.datasets)
        if split == "auto":
            split = "val" if config.data.val_size > 0 else "all"
        if split == "all":
            chosen, what = records, "all records"
        else:
            if config.data.val_size <= 0:
                raise LoraforgeError(f"{data[0]}: --split {split} needs data.val_size > 0 (the config holds "
                                     "nothing out) — use --split all")
            chosen, what = _training_split(config, records, split)
        template = template or config.data.template
    else:
        if split not in ("auto", "all"):
            raise LoraforgeError(f"--split {split} needs a config YAML with data.val_size; dataset names and "
                                 "files are evaluated whole")
        specs = resolve_datasets(Path(dataset_dir) if dataset_dir else None, data)
        reports = load_datasets(specs, stage="sft", skip_invalid=skip_invalid)
        chosen, what, names = [r for report in reports for r in report.records], "all records", ", ".join(data)
    if limit is not None and limit < 1:
        raise LoraforgeError(f"--limit {limit}: give a positive number of examples")
    if limit:
        chosen = chosen[:limit]
        what += f", the first {len(chosen)}"
    examples = [_example(record, names) for record in chosen]
    if not examples:
        raise LoraforgeError(f"{names}: no examples to evaluate")
    return EvalData(examples, f"{names}: {what} ({len(examples)} examples)", template)


def _training_split(config, records: list, split: str) -> tuple[list, str]:
    """The records behind train's val (or train) split: train splits the tokenized examples, and
    drops a record whose answer truncation removes entirely, so tokenize the same way here."""
    from loraforge.data.dataset import Examples, split_eval
    from loraforge.data.templates import get_template
    from loraforge.data.tokenize import encode_conversation
    from loraforge.train.run import load_tokenizer

    tokenizer = load_tokenizer(config)
    template = get_template(config.data.template)
    kept = [record for record in records
            if encode_conversation(tokenizer, template, record, cutoff_len=config.data.cutoff_len,
                                   train_on_prompt=config.data.train_on_prompt,
                                   mask_history=config.data.mask_history) is not None]
    # split the record indices exactly as train splits its examples
    indices = Examples([[i] for i in range(len(kept))], [[i] for i in range(len(kept))])
    train_part, val_part = split_eval(indices, config.data.val_size, config.train.seed)
    part = val_part if split == "val" else train_part
    chosen = [kept[row[0]] for row in part.input_ids]
    return chosen, (f"the {split} split of train (data.val_size={config.data.val_size:g}, "
                    f"train.seed={config.train.seed})")


# ---------------------------------------------------------------- generation and scores


def _labels(specs: list[ModelSpec]) -> list[str]:
    """Short, distinct names for the models: the reference's file stem or folder name."""
    from loraforge.models import resolve_model

    labels = []
    for spec in specs:
        name = resolve_model(spec.reference, base=spec.base).name
        label, n = name, 2
        while label in labels:
            label, n = f"{name}-{n}", n + 1
        labels.append(label)
    return labels


def _generate(spec: ModelSpec, label: str, data: EvalData, config: GenerationConfig, n_ctx: int | None,
              device: str | None) -> tuple[list, str, float, str | None]:
    """(completions, engine name, seconds, the template name it used) for one model over every example."""
    from tqdm import tqdm

    from loraforge.data.templates import template_name_in
    from loraforge.infer.engine import open_engine

    engine = open_engine(spec.reference, engine=spec.engine, adapters=list(spec.adapters), n_ctx=n_ctx,
                         template=data.template, base=spec.base, device=device)
    try:
        done, tokens, start = [], 0, time.perf_counter()
        with tqdm(data.examples, desc=label, unit="example", dynamic_ncols=True) as progress:
            for example in progress:
                try:
                    completion = engine.complete(example.messages, config)
                except LoraforgeError as exc:
                    raise LoraforgeError(f"{example.source}: {label}: {exc}") from None
                done.append(completion)
                tokens += len(completion.token_ids)
                progress.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s")
        return done, engine.name, time.perf_counter() - start, template_name_in(engine.chat_template)
    finally:
        engine.close()


def eval_generate(models: list[ModelSpec], data: EvalData, out_dir: Path, config: GenerationConfig | None = None,
                  *, bertscore: BertScoreOptions | None = None, n_ctx: int | None = None,
                  device: str | None = None) -> EvalResult:
    """Generate with each model on the same prompts, score, and write eval.json, eval.md, predictions."""
    from loraforge.outputs import check_new_dir, new_dir

    config = config or GenerationConfig(temperature=0.0)
    out_dir = Path(out_dir)
    check_new_dir(out_dir)
    labels = _labels(models)  # every reference checked before the first model loads
    scorer_info = None
    if bertscore is not None:
        bertscore, scorer_info = check_bertscore(bertscore)
    references = [example.reference for example in data.examples]
    results, rows_per_model = [], []
    for index, (spec, label) in enumerate(zip(models, labels)):
        completions, engine_name, seconds, used = _generate(spec, label, data, config, n_ctx, device)
        if index == 0 and data.template is None and used is not None:
            data.template = used  # the others are asked with the first model's template
        predictions = [completion.text for completion in completions]
        rows = [{**example_metrics(p, r), "prediction_tokens": float(len(c.token_ids))}
                for p, r, c in zip(predictions, references, completions)]
        rows_per_model.append((predictions, completions, rows))
        results.append(ModelResult(label, spec, engine_name, Path(f"predictions.{label}.jsonl"), seconds,
                                   sum(len(c.token_ids) for c in completions), {}))
    if bertscore is not None:
        scorer = bert_scorer(bertscore)
        for predictions, _, rows in rows_per_model:
            for row, scores in zip(rows, bert_scores(scorer, predictions, references)):
                row.update(scores)
    for result, (_, _, rows) in zip(results, rows_per_model):
        result.metrics = mean_metrics(rows)
    table = comparison_table(results)
    evaluation = EvalResult(out_dir, results, data, table, scorer_info)
    with new_dir(out_dir) as tmp:
        for result, (predictions, completions, rows) in zip(results, rows_per_model):
            _write_predictions(tmp / result.predictions, data.examples, predictions, completions, rows)
        (tmp / "eval.json").write_text(json.dumps(_summary(evaluation, config), ensure_ascii=False, indent=2) + "\n",
                                       encoding="utf-8")
        (tmp / "eval.md").write_text(_markdown(evaluation, config), encoding="utf-8")
    return evaluation


def _write_predictions(path: Path, examples: list[EvalExample], predictions: list[str], completions: list,
                       rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for example, prediction, completion, row in zip(examples, predictions, completions, rows):
            out.write(json.dumps({"source": example.source, "messages": example.messages,
                                  "reference": example.reference, "prediction": prediction,
                                  "finish_reason": completion.finish_reason,
                                  "completion_tokens": len(completion.token_ids),
                                  "metrics": {k: round(v, 4) for k, v in row.items()}},
                                 ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- reports

_ROWS = [("bleu-4", "BLEU-4"), ("rouge-1", "ROUGE-1"), ("rouge-2", "ROUGE-2"), ("rouge-l", "ROUGE-L"),
         ("exact_match", "exact match %"), ("bertscore-p", "BERTScore P"), ("bertscore-r", "BERTScore R"),
         ("bertscore-f1", "BERTScore F1"), ("prediction_chars", "answer chars"),
         ("prediction_tokens", "answer tokens"), ("reference_chars", "reference chars")]


def seconds_per_100(result: ModelResult, examples: int) -> float:
    return result.seconds / examples * 100


def comparison_table(results: list[ModelResult]) -> str:
    """Metrics down, models across; with more than one model, Δ = the first model − each other one."""
    first, others = results[0], results[1:]
    header = ["metric", first.label] + [part for r in others for part in (r.label, f"Δ vs {r.label}")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for key, name in _ROWS:
        if key not in first.metrics:
            continue
        cells = [name, f"{first.metrics[key]:.2f}"]
        for other in others:
            cells += [f"{other.metrics[key]:.2f}", f"{first.metrics[key] - other.metrics[key]:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary(evaluation: EvalResult, config: GenerationConfig) -> dict:
    n = len(evaluation.data.examples)
    return {
        "command": "eval generate",
        "data": {"description": evaluation.data.description, "examples": n, "template": evaluation.data.template},
        "generation": config.to_dict(),
        "definition": DEFINITION,
        "bertscore": evaluation.bertscore,
        "models": [{"label": r.label, "reference": r.spec.reference, "base": r.spec.base,
                    "adapters": list(r.spec.adapters), "engine": r.engine, "predictions": str(r.predictions),
                    "seconds": round(r.seconds, 3), "seconds_per_100_examples": round(seconds_per_100(r, n), 3),
                    "completion_tokens": r.completion_tokens,
                    "metrics": {k: round(v, 4) for k, v in r.metrics.items()}} for r in evaluation.models],
    }


def _markdown(evaluation: EvalResult, config: GenerationConfig) -> str:
    n = len(evaluation.data.examples)
    mode = "greedy" if config.greedy else f"sampled (temperature {config.temperature:g}, seed {config.seed})"
    lines = [f"# eval generate: {', '.join(r.label for r in evaluation.models)}", "",
             f"- data: {evaluation.data.description}",
             f"- template: {evaluation.data.template or 'each model’s own'}; {mode}, "
             f"at most {config.max_new_tokens} new tokens"]
    for r in evaluation.models:
        lines.append(f"- {r.label}: `{r.spec.reference}` ({r.engine}), {r.seconds:.1f} s, "
                     f"{seconds_per_100(r, n):.1f} s per 100 examples, predictions in `{r.predictions}`")
    if evaluation.bertscore:
        b = evaluation.bertscore
        lines.append(f"- BERTScore: `{b['model']}` layer {b['layer']} ({b['layer_from']}), "
                     + ("rescaled with " + b["baseline"] if b["baseline"] else "not rescaled"))
    lines += ["", evaluation.table, "", f"{DEFINITION}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the command line


def add_eval_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.infer.options import add_generation_arguments, add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--compare", nargs="+", action="extend", default=[], metavar="MODEL",
                        help="more models asked the same prompts in the same run (e.g. the base), each a HF dir, "
                             "adapter dir or .gguf (engine auto); the table shows the first model minus each")
    parser.add_argument("--data", required=True, action="extend", nargs="+", metavar="CONFIG|DATASET",
                        help="a config YAML (its data section; the val_size split when it has one) or dataset "
                             "names / files (comma-separated or several)")
    parser.add_argument("--dataset-dir", default=None, help="folder with dataset_info.json for dataset names")
    parser.add_argument("--split", choices=["auto", "val", "train", "all"], default="auto",
                        help="with a config: val = the held-out examples (the default when val_size is set), "
                             "train = the rest, all = every record")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N examples")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    parser.add_argument("--bertscore-model", default=None, metavar="DIR",
                        help="also BERTScore with this local encoder folder (e.g. bert-base-chinese); "
                             "nothing is downloaded")
    parser.add_argument("--bertscore-layers", type=int, default=None, metavar="N",
                        help="the layer whose embeddings BERTScore matches (default: bert-score's for a folder "
                             "named like a model it knows, e.g. 8 for bert-base-chinese; else 2/3 of the layers)")
    parser.add_argument("--bertscore-baseline", default=None, metavar="TSV",
                        help="rescale BERTScore with this baseline file (LAYER,P,R,F rows; bert-score ships "
                             "rescale_baseline/zh/bert-base-chinese.tsv; default: raw scores)")
    parser.add_argument("-o", "--output", required=True, help="new folder for eval.json, eval.md, predictions")
    add_generation_arguments(parser)


def run_from_args(args: argparse.Namespace) -> EvalResult:
    """`loraforge eval generate`: the parsed flags → load_eval_data + eval_generate (greedy unless
    --temperature is given)."""
    from loraforge.infer.options import generation_config

    config = generation_config(args)
    if args.temperature is None:
        config.temperature = 0.0
    data = [part.strip() for item in args.data for part in item.split(",") if part.strip()]
    adapters = tuple(a for a in (args.adapter or "").split(",") if a)
    models = [ModelSpec(args.model, args.engine, args.base, adapters)] + [ModelSpec(m) for m in args.compare]
    bertscore = None
    if args.bertscore_model:
        bertscore = BertScoreOptions(Path(args.bertscore_model), args.bertscore_layers,
                                     Path(args.bertscore_baseline) if args.bertscore_baseline else None,
                                     device=args.device)
    elif args.bertscore_layers is not None or args.bertscore_baseline:
        raise LoraforgeError("--bertscore-layers / --bertscore-baseline need --bertscore-model DIR")
    from loraforge.outputs import check_new_dir

    check_new_dir(Path(args.output))  # before the data loads
    examples = load_eval_data(data, dataset_dir=args.dataset_dir, template=args.template, split=args.split,
                              skip_invalid=args.skip_invalid, limit=args.limit)
    return eval_generate(models, examples, Path(args.output), config, bertscore=bertscore, n_ctx=args.n_ctx,
                         device=args.device)
