"""LLaMA-Factory's YAML keys: what each one means in loraforge (the one table).

Every key in LLaMA-Factory's `examples/train_lora`, `train_full`, `train_qlora`,
`merge_lora` and `inference` YAMLs (and the common ones around them in its
`hparams/*.py`) is one of:

- mapped: `LLAMA_FACTORY_ALIASES`, a loraforge key with the same meaning;
- noted: accepted, with a one-line note printed once, because it changes nothing here
  (`do_train`, `report_to: none`, `ddp_timeout`, …);
- refused: its value would change what is trained (or it asks for something loraforge
  does not do), so dropping it would train another model than the user asked for. The
  reason names what loraforge does instead.

A noted key lists the values (`fine`) it is harmless with; any other value is refused:
`report_to: none` is a note, `report_to: wandb` is not, because nothing would reach wandb.
A few keys need the whole config to decide (`bf16`, `quantization_bit`): config.py
handles those after all keys are read.

`loraforge merge FILE.yaml` and `loraforge chat FILE.yaml` read LLaMA-Factory's merge_lora
and inference YAMLs through `MERGE_KEYS` / `CHAT_KEYS` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

# LLaMA-Factory's flat names → our dotted keys (only where the meaning is the same).
LLAMA_FACTORY_ALIASES = {
    "model_name_or_path": "model.path",
    "trust_remote_code": "model.trust_remote_code",
    "finetuning_type": "method",
    "template": "data.template",
    "dataset": "data.datasets",
    "dataset_dir": "data.dir",
    "cutoff_len": "data.cutoff_len",
    "train_on_prompt": "data.train_on_prompt",
    "mask_history": "data.mask_history",
    "val_size": "data.val_size",
    "max_samples": "data.max_samples",
    "packing": "data.packing",
    "neat_packing": "data.neat_packing",
    "tool_format": "data.tool_format",
    "enable_thinking": "data.enable_thinking",
    "pref_loss": "pref.loss",
    "pref_beta": "pref.beta",
    "pref_ftx": "pref.ftx",
    "simpo_gamma": "pref.simpo_gamma",
    "kto_chosen_weight": "pref.kto_chosen_weight",
    "kto_rejected_weight": "pref.kto_rejected_weight",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target",
    "additional_target": "lora.modules_to_save",
    "use_dora": "lora.use_dora",
    "use_rslora": "lora.use_rslora",
    "output_dir": "train.output_dir",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "eval_steps": "train.eval_steps",
    "seed": "train.seed",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.resume_from_checkpoint",
    "deepspeed": "train.deepspeed",
    "overwrite_output_dir": "train.overwrite_output_dir",
    "dataloader_num_workers": "train.dataloader_workers",
    "ddp_backend": "train.ddp_backend",
}

# LLaMA-Factory's (that is, the HF Trainer's) defaults where they differ from loraforge's
# and change what is trained. They apply to a LLaMA-Factory YAML (one that names
# `model_name_or_path`) for the keys it leaves out, so it trains as it would there.
LLAMA_FACTORY_DEFAULTS = {
    "train.lr": 5e-5,
    "train.scheduler": "linear",
    "train.batch_size": 8,
    "train.group_by_length": False,
    "data.cutoff_len": 2048,
}

# Keys that set the model / data / trainer while `loraforge train` runs: which are set
# after all keys are read, because the right value depends on another key or the machine.
DEFERRED = ("bf16", "fp16", "quantization_bit")


@dataclass(frozen=True)
class LfKey:
    """How loraforge takes one LLaMA-Factory key that has no loraforge field."""

    note: str = ""  # accepted (with the `fine` values): why it changes nothing here
    refuse: str = ""  # refused (any other value): why, and what loraforge does instead; may use {value}
    fine: tuple | None = None  # values accepted with the note; None: every value


def _note(text: str, fine: tuple | None = None, otherwise: str = "") -> LfKey:
    return LfKey(note=text, fine=fine, refuse=otherwise)


def _refuse(text: str) -> LfKey:
    return LfKey(refuse=text)


def _off(text: str) -> LfKey:
    """A feature switch: off (LLaMA-Factory's default) is the same as leaving it out; on is refused."""
    return LfKey(note="off, as in loraforge", fine=(False, None, 0, "none"), refuse=text)


_MULTIMODAL = ("loraforge trains text-only LLaMA-family models; images, videos and audio are not supported — "
               "use a text model and text data, and remove the key")
_RAY = ("Ray is not used: train on several GPUs with torchrun "
        "(`torchrun --nproc_per_node N -m loraforge train FILE.yaml`)")
_EXPORT = ("a merge_lora/export key: run `loraforge merge FILE.yaml` for a LLaMA-Factory merge YAML "
           "(GGUF: `loraforge export gguf`)")
_INFER = "an inference key: run `loraforge chat FILE.yaml` for a LLaMA-Factory inference YAML"
_GENERATION = "generation settings are not used in training (give them to loraforge chat / generate / serve)"
_ADAPTER = ("training on top of an existing adapter is not supported: merge it into the base first "
            "(`loraforge merge --base BASE --adapter {value} -o MERGED`) and train with model_name_or_path: MERGED; "
            "to continue an unfinished run use resume_from_checkpoint")
_OPTIMIZER = "loraforge trains with the Trainer's AdamW (adamw_torch); remove the key"
_NO_DOWNLOAD = "loraforge does not download models (model_name_or_path is a local folder)"
_PPO = "PPO is not available: train a reward model (stage: rm) or tune on preferences directly (stage: dpo or kto)"
_FREEZE = ("finetuning_type: freeze (training some layers in full) is not supported: use finetuning_type: lora, "
           "or full")

LLAMA_FACTORY_KEYS: dict[str, LfKey] = {
    # what to run
    "do_train": _note("`loraforge train` always trains", fine=(True,),
                      otherwise="do_train: false makes LLaMA-Factory only evaluate or predict; "
                                "use `loraforge eval generate` / `loraforge eval ppl` for that"),
    "do_eval": _note("loraforge computes a held-out loss when val_size > 0"),
    "do_predict": _off("prediction is `loraforge generate` / `loraforge eval generate` on the trained run"),
    "predict_with_generate": _off("prediction is `loraforge generate` / `loraforge eval generate` on the trained run"),
    "tokenized_path": _refuse("loraforge caches tokenized data by content under data.cache_dir; "
                              "`loraforge data check FILE.yaml` tokenizes ahead of training"),
    # logging and saving
    "plot_loss": _note("loss.png is always written to the run directory"),
    "report_to": _note("the run directory holds trainer_log.jsonl and loss.png", fine=("none", None, False, ()),
                       otherwise="nothing is sent to {value}: the run directory holds trainer_log.jsonl and "
                                 "loss.png; set report_to: none"),
    "save_only_model": _note("checkpoints keep the optimizer state, so resume_from_checkpoint can continue a run"),
    "save_strategy": _note("a checkpoint is saved every save_steps steps"),
    "eval_strategy": _note("with val_size > 0 loraforge evaluates every eval_steps steps (default logging_steps)"),
    "evaluation_strategy": _note("with val_size > 0 loraforge evaluates every eval_steps steps"),
    "per_device_eval_batch_size": _note("eval batches are per_device_train_batch_size examples"),
    "eval_on_each_dataset": _note("the held-out loss is over all datasets together"),
    "compute_accuracy": _note("loraforge reports the held-out loss; token accuracy is not computed"),
    "logging_dir": _note("logs go to the run directory (output_dir)"),
    "run_name": _note("the run is named by its directory (output_dir)"),
    "logging_first_step": _note("the first step is always logged"),
    "include_effective_tokens_per_second": _note("trainer_log.jsonl counts the non-padding tokens seen"),
    "include_tokens_per_second": _note("trainer_log.jsonl counts the non-padding tokens seen"),
    "use_swanlab": _off("nothing is sent to SwanLab: the run directory holds trainer_log.jsonl and loss.png"),
    "push_to_hub": _off("loraforge uploads nothing; the run directory is an ordinary peft adapter folder"),
    "hub_model_id": _refuse("loraforge uploads nothing; the run directory is an ordinary peft adapter folder"),
    # processes and speed (the same math either way)
    "ddp_timeout": _note("loraforge keeps the Trainer's torch.distributed timeout"),
    "ddp_find_unused_parameters": _note("the Trainer's default is kept"),
    "preprocessing_num_workers": _note("tokenization runs in one process and is cached by content (data.cache_dir)"),
    "preprocessing_batch_size": _note("tokenization runs in one process and is cached by content (data.cache_dir)"),
    "overwrite_cache": _note("the tokenized-data cache is keyed by content: a changed input never reads a stale cache"),
    "gradient_checkpointing_kwargs": _note("loraforge picks the checkpointing mode itself"),
    "use_reentrant_gc": _note("loraforge picks the checkpointing mode itself"),
    "disable_gradient_checkpointing": _note("checkpointing is off unless gradient_checkpointing: true"),
    "flash_attn": _note("transformers picks the attention kernel (sdpa): the same math"),
    "use_unsloth": _note("unsloth's kernels are not used: the same math, transformers' kernels"),
    "use_unsloth_gc": _note("unsloth's kernels are not used: the same math, transformers' kernels"),
    "enable_liger_kernel": _note("liger kernels are not used: the same math, transformers' kernels"),
    "low_cpu_mem_usage": _note("transformers' loader is used as it is"),
    "use_fast_tokenizer": _note("loraforge loads the folder's tokenizer.json (the fast tokenizer) through one loader"),
    "print_param_status": _note("the trainable parameter count is printed at the start"),
    "tf32": _note("the Trainer's default is kept"),
    "enable_torch_profiler": _off("the profiler is not wired in; benchmarks/ has the throughput scripts"),
    # downloads
    "cache_dir": _note(f"{_NO_DOWNLOAD}; the tokenized-data cache is data.cache_dir"),
    "hf_hub_token": _note(_NO_DOWNLOAD),
    "ms_hub_token": _note(_NO_DOWNLOAD),
    "om_hub_token": _note(_NO_DOWNLOAD),
    "model_revision": _note(_NO_DOWNLOAD, fine=("main",),
                            otherwise=f"{_NO_DOWNLOAD}: put the revision you want in a local folder"),
    # the model
    "adapter_name_or_path": _refuse(_ADAPTER),
    "adapter_folder": _refuse(_ADAPTER),
    "create_new_adapter": _off(_ADAPTER),
    "resize_vocab": _note("embed_tokens and lm_head grow by themselves when model.tokenizer is larger"),
    "add_tokens": _refuse("extend the vocabulary with `loraforge vocab merge` and `vocab resize`, then set "
                          "model.tokenizer"),
    "add_special_tokens": _refuse("extend the vocabulary with `loraforge vocab merge` and `vocab resize`, then set "
                                  "model.tokenizer"),
    "split_special_tokens": _off("special tokens are always single tokens (as in llama.cpp)"),
    "rope_scaling": _off("RoPE scaling is not applied in training (it changes the positions the model sees); "
                         "train within the model's own context"),
    "shift_attn": _off("shift short attention (LongLoRA) is not available"),
    "mixture_of_depths": _off("mixture-of-depths is not available"),
    "upcast_layernorm": _off("layer norms stay in the training precision"),
    "upcast_lmhead_output": _off("the output head stays in the training precision"),
    "train_from_scratch": _off("loraforge fine-tunes an existing model's weights"),
    "moe_aux_loss_coef": _off("the MoE auxiliary loss is not added; loraforge trains dense LLaMA-family models"),
    "quantization_method": _note("bitsandbytes is how quantization_bit: 4 (method: qlora) loads the base",
                                 fine=("bnb", "bitsandbytes"),
                                 otherwise="quantization_method: {value} is not available: method: qlora loads the "
                                           "base in 4-bit NF4 with bitsandbytes (use quantization_method: bnb); a "
                                           "GPTQ/AWQ/AQLM checkpoint cannot be trained here — start from the "
                                           "full-precision model"),
    "quantization_type": _note("NF4, as method: qlora", fine=("nf4",),
                               otherwise="method: qlora quantizes to NF4 only; use quantization_type: nf4"),
    "double_quantization": _note("method: qlora double-quantizes, as LLaMA-Factory's default", fine=(True,),
                                 otherwise="method: qlora always double-quantizes the scales "
                                           "(bnb_4bit_use_double_quant); remove double_quantization: false"),
    "quantization_device_map": _note("the Trainer places the quantized model"),
    # multimodal
    **{key: _refuse(_MULTIMODAL) for key in (
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
        "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
        "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "media_dir")},
    # Ray
    **{key: _refuse(_RAY) for key in (
        "ray_num_workers", "ray_init_kwargs", "ray_run_name", "ray_storage_path", "ray_storage_filesystem",
        "resources_per_worker", "placement_strategy")},
    # data
    "default_system": _refuse("the system prompt is the template's default or each record's system field; "
                              "put the prompt into the data"),
    "mix_strategy": _note("datasets are concatenated", fine=("concat",),
                          otherwise="datasets are concatenated; interleaving ({value}) is not available"),
    "interleave_probs": _refuse("datasets are concatenated; interleaving is not available"),
    "streaming": _off("datasets are read whole and cached; streaming is not available"),
    "buffer_size": _note("datasets are read whole (no streaming buffer)"),
    "ignore_pad_token_for_loss": _note("padding is never learned", fine=(True,),
                                       otherwise="padding is never learned in loraforge"),
    "disable_shuffling": _off("examples are shuffled (train.seed); unshuffled training is not available"),
    "eval_dataset": _refuse("a separate eval set is not read: loraforge holds out val_size of the training data; "
                            "score another set afterwards with `loraforge eval generate` or `eval ppl`"),
    # method
    "freeze_trainable_layers": _refuse(_FREEZE),
    "freeze_trainable_modules": _refuse(_FREEZE),
    "freeze_extra_modules": _refuse(_FREEZE),
    "pure_bf16": _off("full fine-tuning keeps fp32 master weights with bf16 autocast; use bf16: true"),
    "optim": _note("AdamW, as the Trainer's default", fine=("adamw_torch", "adamw_torch_fused"), otherwise=_OPTIMIZER),
    "use_galore": _off(_OPTIMIZER),
    "use_apollo": _off(_OPTIMIZER),
    "use_badam": _off(_OPTIMIZER),
    "use_adam_mini": _off(_OPTIMIZER),
    "use_muon": _off(_OPTIMIZER),
    "use_llama_pro": _off("LLaMA Pro block expansion is not available"),
    "loraplus_lr_ratio": _off("LoRA+ (a larger learning rate for B) is not available; LoRA's A and B share lr"),
    "pissa_init": _off("PiSSA initialisation is not available; LoRA starts from B = 0"),
    "pissa_convert": _off("PiSSA initialisation is not available"),
    "neftune_noise_alpha": _off("NEFTune embedding noise is not available"),
    "use_dft_loss": _off("the DFT loss is not available; SFT uses cross-entropy"),
    "use_asft_loss": _off("the ASFT loss is not available; SFT uses cross-entropy"),
    "use_eaft_loss": _off("the EAFT loss is not available; SFT uses cross-entropy"),
    "early_stopping_steps": _off("training runs max_steps or num_train_epochs; early stopping is not available"),
    "dpo_label_smoothing": _off("label smoothing for DPO is not available"),
    "pref_bco_weight": _off("the BCO term is not available"),
    "ld_alpha": _off("LD-DPO is not available"),
    "ref_model": _refuse("the reference model is the base model with the adapter switched off "
                         "(LLaMA-Factory's default); a separate reference model is not available"),
    "ref_model_adapters": _refuse("the reference model is the base model with the adapter switched off"),
    "ref_model_quantization_bit": _refuse("the reference model is the base model with the adapter switched off"),
    **{key: _refuse(_PPO) for key in (
        "reward_model", "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type",
        "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards")},
    # other commands' keys in a training YAML
    **{key: _refuse(_EXPORT) for key in (
        "export_dir", "export_size", "export_device", "export_quantization_bit", "export_quantization_dataset",
        "export_quantization_nsamples", "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id")},
    **{key: _refuse(_INFER) for key in (
        "infer_backend", "infer_dtype", "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank",
        "vllm_config", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config")},
    **{key: _note(_GENERATION) for key in (
        "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens",
        "repetition_penalty", "length_penalty", "skip_special_tokens", "eval_num_beams")},
}

# A loraforge value that LLaMA-Factory also has but loraforge cannot train.
VALUE_REFUSALS: dict[tuple[str, Any], str] = {
    ("method", "freeze"): _FREEZE,
    ("method", "oft"): "OFT is not available: use finetuning_type: lora (or full)",
    ("stage", "ppo"): _PPO,
}

# Names other tools (and LLaMA-Factory's command line) use for our keys: a hint from a
# table before any string distance, because distance alone suggests `do_train` → `train`.
HINTS = {
    "base_model": "model.path", "model_path": "model.path", "model_name": "model.path", "model_id": "model.path",
    "tokenizer_name_or_path": "model.tokenizer", "tokenizer_path": "model.tokenizer",
    "tokenizer_name": "model.tokenizer",
    "sequence_len": "data.cutoff_len", "max_seq_length": "data.cutoff_len", "max_seq_len": "data.cutoff_len",
    "model_max_length": "data.cutoff_len", "seq_length": "data.cutoff_len",
    "datasets": "data.datasets", "data_dir": "data.dir", "data_path": "data.datasets", "data_files": "data.datasets",
    "micro_batch_size": "train.batch_size", "per_device_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size", "num_epochs": "train.epochs",
    "lr_scheduler": "train.scheduler", "scheduler_type": "train.scheduler",
    "lora_r": "lora.r", "lora_target_modules": "lora.target", "target_modules": "lora.target",
    "lora_modules_to_save": "lora.modules_to_save",
    "load_in_4bit": "quantization_bit: 4 (method: qlora)",
    "val_set_size": "data.val_size", "test_size": "data.val_size", "eval_size": "data.val_size",
    "gradient_accumulation": "train.grad_accum", "accumulate_grad_batches": "train.grad_accum",
    "dataset_info": "data.dir (the folder that holds dataset_info.json)",
    "template_name": "data.template", "chat_template": "data.template",
}


def lf_value(value: Any) -> Any:
    """A YAML value as the table compares it: `none`, `[none]` and `None` read alike."""
    if isinstance(value, list) and len(value) <= 1:
        value = value[0] if value else ()
    if isinstance(value, str):
        value = value.strip().lower()
    return value


def judge(key: str, value: Any, table: dict[str, LfKey] = LLAMA_FACTORY_KEYS) -> tuple[str, str] | None:
    """('note', text) or ('refuse', text) for a key in `table`; None for a key it does not hold."""
    rule = table.get(key)
    if rule is None:
        return None
    plain = lf_value(value)
    if rule.note and (rule.fine is None or plain in rule.fine):
        return "note", rule.note
    return "refuse", rule.refuse.format(value=value)


def shown(key: str, value: Any) -> str:
    """'key: value' as a user wrote it (YAML spelling; a long mapping is left out)."""
    if isinstance(value, (dict, list)) and len(str(value)) > 40:
        return f"'{key}'"
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"'{key}: {text}'"


def refusal_text(key: str, value: Any, reason: str) -> str:
    return f"{shown(key, value)} is not supported — {reason}"


def read_yaml_mapping(path: Path) -> tuple[dict, dict[str, int], list[str]]:
    """A YAML file's top-level mapping, each dotted key's line, and keys written twice."""
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"config file {path} does not exist")
    text = read_text(path)
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LoraforgeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise LoraforgeError(f"{path}: expected a mapping of config keys at the top level")
    lines: dict[str, int] = {}
    twice: list[str] = []

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = prefix + str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                # PyYAML keeps the last one silently; which one the user meant is theirs to say
                twice.append(f"{path}: '{key}' is written twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
            walk(value_node, key + ".")

    walk(root, "")
    return raw, lines, twice


# --- LLaMA-Factory's merge_lora and inference YAMLs --------------------------------------

# LLaMA-Factory key → the `loraforge merge` / `loraforge chat` argument it sets (argparse dest)
MERGE_KEYS = {
    "model_name_or_path": "base",
    "adapter_name_or_path": "adapter",
    "export_dir": "output",
    "export_size": "max_shard_gb",  # LLaMA-Factory: "the file shard size (in GB)"
}
MERGE_NOTES: dict[str, LfKey] = {
    "template": _note("the merged model keeps the chat template its adapter was trained with (saved in the run's "
                      "tokenizer); `loraforge export gguf --template NAME` chooses another for a GGUF"),
    "trust_remote_code": _note("the streamed merge runs no model code"),
    "export_device": _note("loraforge merges on the CPU, one tensor at a time (memory: the largest tensor)"),
    "export_legacy_format": _note("safetensors, as LLaMA-Factory's default", fine=(False,),
                                  otherwise="loraforge writes safetensors (or --format pth for Meta's layout), "
                                            "not pytorch_model.bin"),
    "finetuning_type": _note("the adapter's own adapter_config.json says how it merges", fine=("lora", "full")),
    "stage": _note("merging does not depend on the stage"),
    **{key: _refuse("GPTQ export is not available: loraforge quantizes to GGUF — `loraforge export gguf --base BASE "
                    "--adapter ADAPTER --quant Q4_K_M -o model.gguf` (with an importance matrix: export imatrix)")
       for key in ("export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
                   "export_quantization_maxlen")},
    "export_hub_model_id": _refuse("loraforge uploads nothing; the merged folder is an ordinary HF model"),
    "quantization_bit": _refuse("merge into the full-precision base: a LoRA merged into a quantized base loses "
                                "precision (LLaMA-Factory's examples say the same)"),
}
CHAT_KEYS = {
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapter",
    "template": "template",
    "default_system": "system",
    "vllm_maxlen": "n_ctx",
    # generation: the same names as loraforge's flags
    **{key: key for key in ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "num_beams")},
}
ENGINES = {"huggingface": "hf", "hf": "hf", "vllm": "vllm"}
CHAT_NOTES: dict[str, LfKey] = {
    "infer_backend": _note("sets --engine", fine=tuple(ENGINES),
                           otherwise="infer_backend: {value} is not available: loraforge runs transformers "
                                     "(huggingface), vllm, or llama.cpp for a .gguf"),
    "trust_remote_code": _note("LLaMA-family models load without remote code"),
    "infer_dtype": _note("the engine picks the dtype (bf16/fp16 on CUDA, fp32 on CPU)"),
    "skip_special_tokens": _note("special tokens are never shown", fine=(True,),
                                 otherwise="special tokens are never shown in loraforge's output"),
    "do_sample": _note("false: greedy (temperature 0)", fine=(True, False)),
    "enable_thinking": _note("the template decides how a <think> segment is shown"),
    "stage": _note("not used for chat"),
    "finetuning_type": _note("not used for chat: an adapter's adapter_config.json says what it is"),
    "vllm_gpu_util": _note("the vllm engine's default is kept"),
    "vllm_enforce_eager": _note("the vllm engine's default is kept"),
    "vllm_max_lora_rank": _note("the vllm engine reads the adapter's rank"),
    "quantization_bit": _refuse("load-time quantization is not available for chat: export a quantized GGUF "
                                "(`loraforge export gguf --quant Q4_K_M`) and chat with the .gguf"),
    "length_penalty": _note("transformers' beam search default", fine=(1, 1.0),
                            otherwise="a beam length penalty other than 1.0 is not available"),
    "max_length": _note("max_new_tokens bounds the answer; the context is the model's (or vllm_maxlen)"),
}
# LLaMA-Factory's generation defaults (hparams/generating_args.py), where loraforge's differ:
# an inference YAML that leaves them out samples as it does there.
CHAT_DEFAULTS = {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": 1024, "min_p": 0.0}


def _reader_of(key: str, command: str) -> str:
    """Where a key that `command` does not read belongs, as a pointer for the user."""
    if key in MERGE_KEYS or key in MERGE_NOTES:
        return " (a merge_lora key: `loraforge merge FILE.yaml`)"
    if key in CHAT_KEYS or key in CHAT_NOTES:
        return " (an inference key: `loraforge chat FILE.yaml`)"
    if key in LLAMA_FACTORY_ALIASES or key in LLAMA_FACTORY_KEYS or key in DEFERRED:
        return " (a training key: `loraforge train FILE.yaml`)"
    return ""


def read_lf_command(path: str | Path, command: str) -> tuple[dict[str, Any], list[str]]:
    """A LLaMA-Factory merge_lora (`merge`) or inference (`chat`) YAML → that command's arguments, notes.

    Every key is looked at; all the keys it cannot take are listed in one error.
    """
    keys, notes_table = (MERGE_KEYS, MERGE_NOTES) if command == "merge" else (CHAT_KEYS, CHAT_NOTES)
    raw, lines, problems = read_yaml_mapping(Path(path))
    args: dict[str, Any] = {}
    notes: list[str] = []
    unread: dict[str, list[str]] = {}  # which command reads them → keys
    for key, value in raw.items():
        at = f" (line {lines[key]})" if key in lines else ""
        if key in keys:
            if key in ("adapter_name_or_path", "dataset") and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            args[keys[key]] = value
            continue
        verdict = judge(key, value, notes_table)
        if verdict is None:
            unread.setdefault(_reader_of(key, command), []).append(f"'{key}'{at}")
        elif verdict[0] == "refuse":
            problems.append(f"{path}: {refusal_text(key, value, verdict[1])}{at}")
        elif key == "infer_backend":
            args["engine"] = ENGINES[lf_value(value)]
        elif key == "do_sample":
            if not value:
                args["temperature"] = 0.0  # greedy, as transformers' do_sample: false
        else:
            notes.append(f"{key}: {verdict[1]}")
    for reader, names in unread.items():
        problems.append(f"{path}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not read by "
                        f"`loraforge {command}`{reader}; it reads {', '.join([*keys, *notes_table])}")
    if command == "chat":
        left_out = {k: v for k, v in CHAT_DEFAULTS.items() if k not in args}
        args = {**left_out, **args}
        if left_out:
            notes.append("LLaMA-Factory's generation defaults apply to what the YAML leaves out: "
                         + ", ".join(f"{k}={v}" for k, v in left_out.items()))
    if problems:
        raise LoraforgeError(problems[0] if len(problems) == 1 else
                             f"{path}: {len(problems)} keys need a change (all of them are listed):\n  "
                             + "\n  ".join(problems))
    return args, notes
