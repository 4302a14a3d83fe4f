"""One config: a YAML file plus `key=value` overrides, validated with pydantic.

Sections mirror the pipeline (model, data, lora, train). Field names are short, and a
LLaMA-Factory YAML is read as it is: each of its flat names is mapped to our key with the
same meaning (`learning_rate`, `lora_rank`, `cutoff_len`, …), accepted with a note when it
means nothing here (`do_train`, `report_to: none`), or refused with the reason
(config_lf.py holds that table). Every bad key of a run — unknown, refused, wrong type —
is reported in one error with its file and line; unknown keys get a hint.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraforge import config_lf
from loraforge.errors import LoraforgeError

Stage = Literal["pt", "sft", "dpo", "kto", "rm"]
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
    packing: bool = Field(False, description="sft: several examples per row up to cutoff_len (attention kept within each)")
    neat_packing: bool = Field(False, description="sft: packing with no attention across examples (LLaMA-Factory's name)")
    tool_format: str | None = Field(None, description="how tools and tool calls are written (default: the template's own)")
    enable_thinking: bool | None = Field(True, description="reasoning templates: keep <think> segments (LLaMA-Factory's enable_thinking)")

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


class PrefConfig(Section):
    """Preference stages (dpo, kto, rm), with LLaMA-Factory's meanings."""

    loss: Literal["sigmoid", "ipo", "orpo", "simpo"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo, orpo (no reference model), simpo (LLaMA-Factory: pref_loss)")
    beta: float = Field(0.1, gt=0, description="dpo/kto: strength of the preference (LLaMA-Factory: pref_beta)")
    ftx: float = Field(0.0, ge=0, description="dpo: weight of an SFT loss on the chosen answer (LLaMA-Factory: pref_ftx)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    kto_chosen_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples")
    kto_rejected_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples")
    score_threshold: float | None = Field(
        None, description="kto on reward-scored data: answers scored at least this are desirable (default: the median)")


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
    stage: Stage = Field("sft", description="pt: continued pre-training on raw text; sft: instruction tuning; "
                         "dpo / kto: preference tuning; rm: a reward model")
    method: Method = Field("lora", description="lora | qlora | full | adalora | prompt_tuning | prefix_tuning | p_tuning")
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    pref: PrefConfig = PrefConfig()
    train: TrainConfig


# LLaMA-Factory's keys (mapped, noted, refused) live in one table: config_lf.py.
LLAMA_FACTORY_ALIASES = config_lf.LLAMA_FACTORY_ALIASES


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
    """' — did you mean …?' for a key loraforge does not know.

    First a table of names other tools use for our keys (config_lf.HINTS), then string
    distance over our dotted keys, bare leaf names and every LLaMA-Factory name we know.
    """
    leaf = key.rsplit(".", 1)[-1]
    for query in (key, leaf):
        if query in config_lf.HINTS:
            return f" — did you mean '{config_lf.HINTS[query]}'?"
    ours = valid_keys()
    names: dict[str, str] = {k: k for k in ours}
    names.update({k: k for k in config_lf.LLAMA_FACTORY_KEYS})
    names.update(LLAMA_FACTORY_ALIASES)
    leaves: dict[str, str] = {k.rsplit(".", 1)[-1]: k for k in ours if "." in k}
    leaves.update(LLAMA_FACTORY_ALIASES)
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


_LINE = re.compile(r"\(lines? (\d+)")


class _Reading:
    """Keys read so far: the nested tree, and everything to tell the user about them."""

    def __init__(self) -> None:
        self.tree: dict = {}
        self.problems: list[str] = []  # every bad key of the run, each with its file, line and fix
        self.notes: dict[str, str] = {}  # key → its note, printed once
        self.set_by: dict[str, tuple[str, str]] = {}  # dotted key → (key as written, origin)
        self.where: dict[str, str] = {}  # dotted key → "origin (line N)", for validation errors
        self.deferred: dict[str, tuple[Any, str, str]] = {}  # bf16, fp16, quantization_bit → value, origin, at
        self.refused: dict[tuple[str, str], list[str]] = {}  # (origin, reason) → "'key: value' (line N)", …

    def refuse(self, origin: str, key: str, value: Any, reason: str, at: str) -> None:
        """Keys refused for one reason (a multimodal YAML has seven) are listed on one line."""
        self.refused.setdefault((origin, reason), []).append(f"{config_lf.shown(key, value)}{at}")

    def all_problems(self) -> list[str]:
        grouped = [f"{origin}: {', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not supported — {reason}"
                   for (origin, reason), keys in self.refused.items()]
        # in the file's order (the line each names); the command line's come after
        return sorted([*grouped, *self.problems], key=lambda text: int(m[1]) if (m := _LINE.search(text)) else 1 << 30)


def _normalise(items: list[tuple[str, Any]], origin: str, reading: _Reading | None = None,
               lines: dict[str, int] | None = None) -> dict:
    """Map aliases to dotted keys, judge LLaMA-Factory keys, build the nested dict.

    Bad keys are collected in `reading.problems` (all of them, not only the first); with no
    `reading`, the first one is raised.
    """
    own = reading is None
    reading = reading or _Reading()
    known = set(valid_keys())
    for key, value in items:
        line = (lines or {}).get(key)
        at = f" (line {line})" if line else ""
        if key in config_lf.DEFERRED:
            reading.deferred[key] = (value, origin, at)
            continue
        verdict = config_lf.judge(key, value)
        if verdict is not None:
            kind, text = verdict
            if kind == "note":
                reading.notes.setdefault(key, f"{key}: {text}")
            else:
                reading.refuse(origin, key, value, text, at)
            continue
        target = LLAMA_FACTORY_ALIASES.get(key, key)
        plain = config_lf.lf_value(value)
        refusal = config_lf.VALUE_REFUSALS.get((target, plain)) if isinstance(plain, (str, bool, int)) else None
        if refusal:
            reading.refuse(origin, key, value, refusal, at)
            continue
        if target not in known:
            reading.problems.append(f"{origin}: unknown config key '{key}'{_closest(key)}{at}")
            continue
        earlier = reading.set_by.get(target)
        if earlier and earlier[1] == origin and earlier[0] != key:
            reading.problems.append(f"{origin}: '{key}' and '{earlier[0]}' both set {target}{at}; keep one")
            continue
        try:
            _set_dotted(reading.tree, target, value, origin)
        except LoraforgeError as exc:
            reading.problems.append(f"{exc}{at}")
            continue
        reading.set_by[target] = (key, origin)
        reading.where[target] = f"{origin}{at}"
    if own and reading.all_problems():
        raise LoraforgeError(reading.all_problems()[0])
    return reading.tree


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_deferred(reading: _Reading) -> None:
    """LLaMA-Factory keys whose loraforge value depends on another key or on the machine."""
    tree = reading.tree
    flags = {k: reading.deferred[k] for k in ("bf16", "fp16") if k in reading.deferred}
    on = [k for k, (value, _, _) in flags.items() if value]
    if len(on) == 2:
        _, origin, at = flags["fp16"]
        reading.problems.append(f"{origin}: bf16 and fp16 are both true{at}; choose one")
    elif on:
        key = on[0]
        _, origin, at = flags[key]
        precision_by = reading.set_by.get("train.precision")
        if precision_by and precision_by[1] == origin:
            reading.problems.append(f"{origin}: '{key}' and '{precision_by[0]}' both set the precision{at}; keep one")
        elif precision_by:
            pass  # train.precision on the command line wins over the file's bf16/fp16
        elif _has_cuda():
            _set_dotted(tree, "train.precision", key, origin)
            reading.where["train.precision"] = f"{origin}{at}"
        else:
            # LLaMA-Factory's YAMLs all say bf16: true, written for GPUs; on a CPU the Trainer
            # would autocast to bf16, which loraforge does not do: fp32 trains the same model.
            _set_dotted(tree, "train.precision", "fp32", origin)
            reading.notes.setdefault(key, f"{key}: true needs a CUDA GPU; there is none here, so this run "
                                          "trains in fp32")
    else:
        for key in flags:
            reading.notes.setdefault(key, f"{key}: false — loraforge picks the precision (train.precision: auto "
                                          "is bf16 or fp16 on CUDA, fp32 on CPU)")
    if "quantization_bit" in reading.deferred:
        bits, origin, at = reading.deferred["quantization_bit"]
        method = tree.get("method", "lora")
        if bits is None:
            pass
        elif bits != 4:
            reading.refuse(origin, "quantization_bit", bits, "method: qlora is 4-bit NF4 only; use quantization_bit: 4, "
                           "or leave it out for a full-precision base", at)
        elif method not in ("lora", "qlora"):
            reading.problems.append(f"{origin}: quantization_bit: 4 trains LoRA on a 4-bit base and cannot go with "
                                    f"finetuning_type: {method}{at}; use finetuning_type: lora")
        else:
            tree["method"] = "qlora"
            reading.where["method"] = f"{origin}{at}"
            reading.notes.setdefault("quantization_bit", "quantization_bit: 4 → method: qlora (bitsandbytes NF4, "
                                                         "double-quantized)")


def _apply_llama_factory_defaults(reading: _Reading) -> None:
    applied = []
    for key, value in config_lf.LLAMA_FACTORY_DEFAULTS.items():
        if key not in reading.set_by:
            _set_dotted(reading.tree, key, value, "LLaMA-Factory's defaults")
            applied.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    if applied:
        reading.notes["(defaults)"] = ("a LLaMA-Factory YAML (it names model_name_or_path): LLaMA-Factory's defaults "
                                       "apply to what it leaves out: " + ", ".join(applied))


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


def read_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """Read a YAML config, apply `key=value` overrides, validate; also the notes to show once.

    LLaMA-Factory YAMLs are read as they are (config_lf.py says how each key is taken).
    Every bad key of the file and the overrides is reported in one error.
    """
    reading = _Reading()
    origin = "command line"
    lf_file = False
    if path is not None:
        path = Path(path)
        origin = str(path)
        raw, lines, twice = config_lf.read_yaml_mapping(path)
        reading.problems.extend(twice)
        lf_file = "model_name_or_path" in raw
        _normalise(_flatten(raw), origin, reading, lines)
    for text in overrides:
        key, value = parse_override(text)
        _normalise([(key, value)], f"override '{text}'", reading)
    _resolve_deferred(reading)
    if lf_file:
        _apply_llama_factory_defaults(reading)
    config = validate(reading.tree, origin, reading.all_problems(), reading.where)
    return config, list(reading.notes.values())


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate (notes are dropped: see read_config)."""
    return read_config(path, overrides)[0]


def validate(tree: dict, origin: str = "config", problems: list[str] = (),
             where: dict[str, str] | None = None) -> Config:
    """The Config, or one error with the key problems found while reading and every invalid value."""
    lines = []
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        config = None
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                lines.append(f"  {key}: required but not set")
            else:
                set_at = (where or {}).get(key)
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})"
                             + (f" — set in {set_at}" if set_at else ""))
    if not problems and config is not None:
        return config
    if not problems:
        raise LoraforgeError(f"{origin}: invalid config\n" + "\n".join(lines))
    if len(problems) == 1 and not lines:
        raise LoraforgeError(problems[0])
    raise LoraforgeError(f"{origin}: {len(problems) + len(lines)} problems in the config (all of them are "
                         "listed; fix them together):\n" + "\n".join([*(f"  {p}" for p in problems), *lines]))


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as saved to `loraforge.yaml` in a run dir."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
