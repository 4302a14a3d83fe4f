"""One config: a YAML file plus `key=value` overrides, validated with pydantic.

Sections mirror the pipeline (model, data, lora, train). Field names are short, and
every LLaMA-Factory flat name with the same meaning (`learning_rate`, `lora_rank`,
`cutoff_len`, `dataset_dir`, …) is accepted as an alias, so a LLaMA-Factory YAML
needs few edits. Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

Stage = Literal["pt", "sft"]
Method = Literal[
    "lora", "qlora", "full", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning"
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _comma_list(value: Any) -> Any:
    """`a,b` on the command line and `[a, b]` in YAML mean the same list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ModelConfig(Section):
    path: str = Field(description="base model: a HF model dir (LLaMA-Factory: model_name_or_path)")
    tokenizer: str | None = Field(None, description="tokenizer dir if not the model's own (e.g. an extended vocabulary)")
    trust_remote_code: bool = Field(False, description="run code shipped with the model; off unless you trust it")


class DataConfig(Section):
    dir: str | None = Field(None, description="folder with dataset_info.json (LLaMA-Factory: dataset_dir)")
    datasets: list[str] = Field(description="dataset names from dataset_info.json, or file paths")
    template: str = Field("default", description="chat template; saved into the run's tokenizer")
    cutoff_len: int = Field(1024, gt=0, description="sft: longest tokenized example; longer ones are truncated")
    block_size: int | None = Field(None, gt=0, description="pt: tokens per training block (default: cutoff_len)")
    train_on_prompt: bool = Field(False, description="also learn the prompt tokens")
    mask_history: bool = Field(False, description="learn only the last answer of multi-turn records")
    val_size: float = Field(0.0, ge=0, description="held-out fraction (<1) or count (>=1) for eval loss")
    skip_invalid: bool = Field(False, description="drop invalid records (and say how many) instead of stopping")
    max_samples: int | None = Field(None, gt=0, description="use at most this many records per dataset")
    cache_dir: str | None = Field(None, description="tokenized-data cache (default ~/.cache/loraforge or $LORAFORGE_CACHE)")

    _split = field_validator("datasets", mode="before")(_comma_list)


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank (LLaMA-Factory: lora_rank)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default 2·r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target: list[str] = Field(["all"], description="module names to adapt, or 'all' linear layers")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    modules_to_save: list[str] = Field([], description="modules trained in full, e.g. embed_tokens,lm_head")
    num_virtual_tokens: int = Field(16, gt=0, description="prompt/prefix/p-tuning: virtual tokens")
    adalora_target_r: int = Field(4, gt=0, description="adalora: average rank after pruning (init rank is r)")

    _split = field_validator("target", "modules_to_save", mode="before")(_comma_list)


class TrainConfig(Section):
    output_dir: str = Field(description="run directory: adapter, tokenizer, logs, checkpoints")
    epochs: float = Field(3.0, gt=0, description="passes over the data (LLaMA-Factory: num_train_epochs)")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(4, gt=0, description="examples per device per step")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(500, gt=0, description="checkpoint every N steps")
    save_total_limit: int | None = Field(None, gt=0, description="keep only the newest N checkpoints")
    eval_steps: int | None = Field(None, gt=0, description="eval every N steps (default logging_steps)")
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA that supports it, else fp16 on CUDA, fp32 on CPU"
    )
    gradient_checkpointing: bool = False
    group_by_length: bool = Field(True, description="batch similar lengths together: less padding")
    resume_from_checkpoint: str | None = Field(None, description="a checkpoint dir, or 'last'")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config, passed to the Trainer")
    ddp_backend: str | None = Field(None, description="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    overwrite_output_dir: bool = False
    dataloader_workers: int = Field(0, ge=0)


class Config(Section):
    stage: Stage = Field("sft", description="pt: continued pre-training on raw text; sft: instruction tuning")
    method: Method = Field("lora", description="lora | qlora | full | adalora | prompt_tuning | prefix_tuning | p_tuning")
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    train: TrainConfig


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
}


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts (sections included)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys.extend(valid_keys(annotation, key + "."))
    return keys


def _closest(key: str) -> str:
    """' — did you mean …?' for a misspelt key: dotted keys, bare leaf names and aliases."""
    names: dict[str, str] = {k: k for k in valid_keys()}
    names.update(LLAMA_FACTORY_ALIASES)
    leaves: dict[str, str] = {k.rsplit(".", 1)[-1]: k for k in valid_keys() if "." in k}
    leaves.update(LLAMA_FACTORY_ALIASES)
    leaf = key.rsplit(".", 1)[-1]
    for query, table, cutoff in ((key, names, 0.75), (leaf, leaves, 0.6), (key, names, 0.5)):
        if query in table and query != key:
            return f" — did you mean '{table[query]}'?"
        match = difflib.get_close_matches(query, list(table), n=1, cutoff=cutoff)
        if match:
            return f" — did you mean '{table[match[0]]}'?"
    return ""


def _set_dotted(tree: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LoraforgeError(f"{origin}: '{key}' sets a field inside '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and _is_section(key):
            items.extend(_flatten(value, key + "."))
        else:
            items.append((key, value))
    return items


def _is_section(key: str) -> bool:
    model: type[BaseModel] = Config
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return False
        model = field.annotation
    return True


def _normalise(items: list[tuple[str, Any]], origin: str) -> dict:
    """Map aliases to dotted keys, reject unknown keys, build the nested dict."""
    known = set(valid_keys())
    tree: dict = {}
    for key, value in items:
        if key in LLAMA_FACTORY_ALIASES:
            key = LLAMA_FACTORY_ALIASES[key]
        if key == "bf16" or key == "fp16":
            if value:
                _set_dotted(tree, "train.precision", key, origin)
            continue
        if key == "method" and value == "freeze":
            raise LoraforgeError(f"{origin}: finetuning_type 'freeze' is not supported; use method: lora or full")
        if key not in known:
            raise LoraforgeError(f"{origin}: unknown config key '{key}'{_closest(key)}")
        _set_dotted(tree, key, value, origin)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=2e-4` → ("train.lr", 0.0002); values are read as YAML scalars."""
    if "=" not in text:
        raise LoraforgeError(f"override '{text}' is not key=value (example: train.lr=2e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 2e-4 as a string (it wants 2.0e-4); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate."""
    items: list[tuple[str, Any]] = []
    origin = "command line"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise LoraforgeError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise LoraforgeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise LoraforgeError(f"{path}: expected a mapping of config keys at the top level")
        items = _flatten(raw)
    tree = _normalise(items, origin)
    for text in overrides:
        key, value = parse_override(text)
        _deep_update(tree, _normalise([(key, value)], f"override '{text}'"))
    return validate(tree, origin)


def _deep_update(tree: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def validate(tree: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                lines.append(f"  {key}: required but not set")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise LoraforgeError(f"{origin}: invalid config\n" + "\n".join(lines)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as saved to `loraforge.yaml` in a run dir."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
