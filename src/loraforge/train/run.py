"""`loraforge train`: one config → a run directory.

Reads top to bottom: tokenizer (with the template saved into it) → tokenized examples
→ base model → method wrapper → transformers Trainer → adapter/model, tokenizer,
loraforge.yaml, trainer_log.jsonl, loss.png. The same code runs data-parallel under
`torchrun` / `accelerate launch`; only the main process writes the run files.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from loraforge.config import Config, dump_config
from loraforge.data.dataset import build_examples, split_eval
from loraforge.data.packing import pack_examples, packing_enabled
from loraforge.data.templates import get_template, jinja_template, template_of  # noqa: F401
from loraforge.data.tokenize import IGNORE
from loraforge.errors import LoraforgeError
from loraforge.tokenizer import has_tokenizer, save_tokenizer
from loraforge.tokenizer import load_tokenizer as load_folder_tokenizer
from loraforge.train.callbacks import JsonlLogger, plot_loss, read_log
from loraforge.train.methods import (
    apply_method,
    check_model_dir,
    compute_dtype,
    has_cuda,
    load_base_model,
    trainable_summary,
)

LOG_NAME = "trainer_log.jsonl"


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    train_examples: int
    eval_loss: float | None = None
    train_rows: int | None = None  # rows the Trainer saw: train_examples, or fewer with data.packing


def load_tokenizer(config: Config):
    """The tokenizer the run trains with (loraforge.tokenizer: sentencepiece's ids for a SentencePiece
    vocabulary), carrying the template as its chat_template."""
    check_model_dir(config.model.path)
    if config.model.tokenizer:
        check_model_dir(config.model.tokenizer, "model.tokenizer")
    source = config.model.tokenizer or config.model.path
    tokenizer = load_folder_tokenizer(Path(source), fallbacks=[Path(config.model.path)],
                                      trust_remote_code=config.model.trust_remote_code)
    tokenizer.chat_template = jinja_template(template_of(config.data))  # tool_format, enable_thinking too
    return tokenizer


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


class PadCollator:
    """Pads a batch to its longest example (right side); labels padded with -100.

    Packed rows (data/packing.py) also carry `position_ids`, restarting at every example; they are
    padded with 0, so each pad token is a sequence of its own that no real token attends to."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        packed = "position_ids" in features[0]
        positions = torch.zeros((len(features), width), dtype=torch.long) if packed else None
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
            if packed:
                positions[row, :n] = torch.tensor(f["position_ids"])
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if packed:
            batch["position_ids"] = positions
        return batch


def packed_forward_inputs(inputs: dict) -> dict:
    """What the model gets for a packed batch: the 2-D mask (which only marks padding, and stays in the
    Trainer's batch so include_num_input_tokens_seen="non_padding" counts real tokens) is dropped, and
    with it the KV cache: transformers builds its block-diagonal mask from position_ids only when it has
    neither (masking_utils._preprocess_mask_arguments), and with either one lets examples see each other."""
    if "position_ids" not in inputs:
        return inputs
    return {**{k: v for k, v in inputs.items() if k != "attention_mask"}, "use_cache": False}


class PackedTrainer(Trainer):
    """The Trainer for packed rows: the model sees `packed_forward_inputs`, the Trainer's own books the whole batch."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, packed_forward_inputs(inputs), *args, **kwargs)


CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it was cut off


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (a run stopped while saving one leaves it without trainer_state.json)."""
    done = [p for p in checkpoints(output_dir) if (p / CHECKPOINT_DONE).is_file()]
    return done[-1] if done else None


def resolve_resume(config: Config, output_dir: Path) -> str | None:
    resume = config.train.resume_from_checkpoint
    if resume is None:
        return None
    if resume == "last":
        last = latest_checkpoint(output_dir)
        cut = [p.name for p in checkpoints(output_dir) if not (p / CHECKPOINT_DONE).is_file()
               and (last is None or int(p.name.split("-")[1]) > int(last.name.split("-")[1]))]
        if cut and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {', '.join(cut)} in {output_dir} is incomplete (no {CHECKPOINT_DONE}: the run was stopped "
                  f"while saving it) — resuming from {last.name if last else 'nothing'}", file=sys.stderr)
        if last is None:
            raise LoraforgeError(f"train.resume_from_checkpoint=last: no complete checkpoint-* in {output_dir}")
        return str(last)
    if not Path(resume).is_dir():
        raise LoraforgeError(f"train.resume_from_checkpoint={resume}: no such checkpoint directory")
    if not (Path(resume) / CHECKPOINT_DONE).is_file():
        raise LoraforgeError(f"train.resume_from_checkpoint={resume}: an incomplete checkpoint (no {CHECKPOINT_DONE}: "
                             "the run was stopped while saving it) — resume from an earlier one, or use last")
    return resume


def check_output_dir(config: Config, output_dir: Path) -> None:
    leftovers = [p for p in ("adapter_model.safetensors", "model.safetensors", LOG_NAME) if (output_dir / p).exists()]
    if leftovers and not config.train.overwrite_output_dir and config.train.resume_from_checkpoint is None:
        raise LoraforgeError(
            f"{output_dir} already holds a run ({leftovers[0]}): choose another train.output_dir, "
            "resume it with train.resume_from_checkpoint=last, or set train.overwrite_output_dir=true")


# methods whose run can carry grown embeddings: full saves them, LoRA-style ones as modules_to_save
RESIZABLE_METHODS = ("full", "lora", "qlora", "adalora")


def check_vocab_fits(model, tokenizer, config: Config) -> None:
    """A tokenizer larger than the embedding: grown for `stage: pt` (new rows from their base pieces), refused
    elsewhere; one smaller than the model's own tokenizer (32000 on a 49953-row model) is refused everywhere."""
    rows = model.get_input_embeddings().weight.shape[0]
    source = config.model.tokenizer or config.model.path
    if len(tokenizer) <= rows:
        _check_own_tokenizer(tokenizer, config, rows)
        return
    if config.stage != "pt" or config.method not in RESIZABLE_METHODS:
        why = "an sft run" if config.stage != "pt" else f"method: {config.method}"
        raise LoraforgeError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            f"ids ≥ {rows} would crash, and {why} does not train new embedding rows — grow the model first "
            f"(loraforge vocab resize --model {config.model.path} --tokenizer {source} -o NEW_BASE, or a "
            "stage: pt run with this tokenizer, which resizes and trains embed_tokens and lm_head), or use the "
            "tokenizer the model was trained with")
    from loraforge.vocab.resize import grow_embeddings

    result = grow_embeddings(model, Path(config.model.path), tokenizer, new_name=source)
    added = []
    if config.method != "full":
        names = {id(model.get_input_embeddings()): "embed_tokens", id(model.get_output_embeddings()): "lm_head"}
        leaves = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in names]
        added = [leaf for leaf in dict.fromkeys(leaves) if leaf not in config.lora.modules_to_save]
        # like LLaMA-Factory's resize_vocab: new rows must be trained, and saved with the adapter
        config.lora.modules_to_save = [*config.lora.modules_to_save, *added]
    if int(os.environ.get("RANK", "0")) == 0:
        trained = f"; training {', '.join(added)} in full (lora.modules_to_save)" if added else ""
        print(f"vocabulary: {source} has {len(tokenizer)} tokens, the model {rows} rows — resized {result.describe()}"
              f"{trained}", flush=True)


def _check_own_tokenizer(tokenizer, config: Config, rows: int) -> None:
    """model.tokenizer pointing at a tokenizer other than the one the model dir carries: the classic mix-up
    (LLaMA's 32000-token tokenizer on Chinese-LLaMA's 49953-row model) or another vocabulary of the same size."""
    if not config.model.tokenizer or not has_tokenizer(Path(config.model.path)):
        return
    from loraforge.vocab.resize import check_extends

    try:
        own = load_folder_tokenizer(Path(config.model.path))
    except LoraforgeError:
        return
    if len(own) > len(tokenizer):
        raise LoraforgeError(
            f"model.tokenizer={config.model.tokenizer} has {len(tokenizer)} tokens but model.path="
            f"{config.model.path} carries its own {len(own)}-token tokenizer ({rows} embedding rows): the model "
            f"was trained with the {len(own)}-token vocabulary (e.g. an extended one) and would read these ids "
            "as other tokens — drop model.tokenizer to use the model's own")
    check_extends(own, tokenizer, config.model.path, config.model.tokenizer)


def check_deepspeed(config: Config) -> None:
    path = config.train.deepspeed
    if path is None:
        return
    if not Path(path).is_file():
        raise LoraforgeError(f"train.deepspeed={path}: no such DeepSpeed JSON file")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise LoraforgeError(f"train.deepspeed={path} needs the deepspeed package: pip install 'loraforge[gpu]' "
                             "(DeepSpeed is for multi-GPU training; on a CPU leave train.deepspeed unset)")


def optimizer_steps(config: Config, train_count: int) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = config.train.batch_size * config.train.grad_accum * world
    return max(1, math.ceil(train_count / per_step) * math.ceil(config.train.epochs))


def training_arguments(config: Config, output_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    t = config.train
    dtype = compute_dtype(config)
    cuda = has_cuda()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo is torch.distributed's CPU backend; naming any backend outside a launcher makes
    # accelerate expect a process group that does not exist
    backend = t.ddp_backend or ("gloo" if distributed and not cuda else None)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps or t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or t.logging_steps,
        seed=t.seed,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name
        deepspeed=t.deepspeed,
        ddp_backend=backend,
        report_to="none",
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False,
    )


def prepare_run(config: Config):
    """What every stage does before it loads a model: refuse a used output dir or a bad DeepSpeed file,
    find the checkpoint to resume, load the tokenizer, tokenize and split the data (and say so).
    Returns (output_dir, resume, tokenizer, train_set, eval_set)."""
    output_dir = Path(config.train.output_dir)
    check_output_dir(config, output_dir)
    check_deepspeed(config)
    resume = resolve_resume(config, output_dir)
    tokenizer = load_tokenizer(config)
    examples, stats = build_examples(config, tokenizer)
    train_set, eval_set = split_eval(examples, config.data.val_size, config.train.seed)
    if int(os.environ.get("RANK", "0")) == 0:
        print(stats.describe(examples, config), flush=True)
    return output_dir, resume, tokenizer, train_set, eval_set


def train(config: Config) -> RunResult:
    """Fine-tune `model.path` on the config's data; returns where the run was written."""
    if config.stage in ("dpo", "kto", "rm"):  # preference stages run on TRL's trainers
        from loraforge.train.preference import train_preference

        return train_preference(config)
    output_dir, resume, tokenizer, train_set, eval_set = prepare_run(config)
    main_process = int(os.environ.get("RANK", "0")) == 0
    train_examples = len(train_set)
    packing = packing_enabled(config)
    if packing:  # after the cache and the split: one cache for both, no eval example in a training row
        train_set = pack_examples(train_set, config.data.cutoff_len)
        eval_set = pack_examples(eval_set, config.data.cutoff_len) if eval_set is not None else None
        if main_process:
            print(train_set.describe(), flush=True)

    # LoRA/prompt weights are initialised before the Trainer seeds anything: seed here, or
    # two runs of the same config start from different adapters
    from transformers import set_seed

    set_seed(config.train.seed)
    model = load_base_model(config)
    check_vocab_fits(model, tokenizer, config)
    model = apply_method(model, config, optimizer_steps(config, len(train_set)))
    if main_process:
        trainable, total = trainable_summary(model)
        print(f"{config.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)",
              flush=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    args = training_arguments(config, output_dir, has_eval=eval_set is not None)
    log_path = output_dir / LOG_NAME
    if args.process_index == 0 and resume is None:
        log_path.unlink(missing_ok=True)
    trainer = (PackedTrainer if packing else Trainer)(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=PadCollator(pad_id(tokenizer)), callbacks=[JsonlLogger(log_path)],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    if eval_set is not None and last_eval_step(log_path) != result.global_step:
        trainer.evaluate()  # the schedule did not end on an eval step: measure the final model

    if trainer.is_world_process_zero():
        save_run(trainer, tokenizer, config, output_dir)
    rows = read_log(log_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return RunResult(output_dir, result.global_step, losses[0] if losses else None,
                     losses[-1] if losses else None, train_examples, evals[-1] if evals else None,
                     train_rows=len(train_set))


def last_eval_step(log_path: Path) -> int | None:
    steps = [r["step"] for r in read_log(log_path) if "eval_loss" in r]
    return steps[-1] if steps else None


def save_run(trainer, tokenizer, config: Config, output_dir: Path) -> None:
    trainer.save_model(str(output_dir))
    if config.method != "full" and config.lora.modules_to_save:
        # after a resize peft also saves the embedding layers under their wrapper names
        # (…modules_to_save.weight, …original_module.weight), which merge, export and other
        # loaders of a plain adapter do not expect; the modules_to_save copies are the trained rows
        trainer.model.save_pretrained(str(output_dir), save_embedding_layers=False)
    # tokenizer.model (when there is one) + tokenizer.json + tokenizer_config.json with the template:
    # what loraforge, plain transformers and export read back
    save_tokenizer(tokenizer, output_dir)
    (output_dir / "loraforge.yaml").write_text(dump_config(config), encoding="utf-8")
    # what this run was trained on (the model's fingerprint, and what it was merged from):
    # merge and export check adapter chains against it
    from loraforge.export.chain import write_trained_on

    write_trained_on(Path(config.model.path), output_dir)
    plot_loss(output_dir / LOG_NAME, output_dir / "loss.png", title=f"{config.stage} · {config.method} · {output_dir.name}")
