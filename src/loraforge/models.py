"""Model references: the one string every command takes, resolved one way.

A reference is a HF model dir (config.json + weights), an adapter dir (peft's
adapter_config.json names the base, which is loaded and the adapter applied), or a
.gguf file. `resolve_model` says which, where the weights, adapters and tokenizer
(with the chat template trained with) are, and refuses anything else with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.errors import LoraforgeError

Kind = Literal["hf", "adapter", "gguf"]
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# an adapter trained on another adapter's run names that run as its base; deeper than this is a loop
_MAX_CHAIN = 8


@dataclass(frozen=True)
class ModelRef:
    """What a model reference points at."""

    kind: Kind
    path: Path  # the reference itself, absolute: the model dir, the (last) adapter dir or the .gguf file
    base_dir: Path | None  # the HF model dir with the base weights (hf: path; adapter: its base; gguf: None)
    adapter_dirs: tuple[Path, ...] = ()  # peft adapters applied on the base, in training order
    tokenizer_dir: Path | None = None  # tokenizer + chat template (gguf: None, both are in the file)

    @property
    def name(self) -> str:
        """A short name for messages and the served model id: the file stem or the folder name."""
        return self.path.stem if self.kind == "gguf" else self.path.name

    @property
    def config_dir(self) -> Path | None:
        """Where config.json is (hf/adapter: the base's)."""
        return self.base_dir


def check_model_dir(path: str | Path, key: str) -> None:
    """The one "no such model directory" rule: a missing local folder is named here, before
    transformers reads it as a hub repo id ("Repo id must be in the form 'repo_name' …")."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise LoraforgeError(f"no such model directory: {path} ({key}) — pass a local folder with config.json "
                             "and the weights (loraforge does not download models)")
    if not folder.is_dir():
        raise LoraforgeError(f"{key} {path} is a file, not a model directory — pass the folder that holds it")


def reward_model_error(what: str) -> LoraforgeError:
    """The one refusal for a stage rm model wherever a generating model is expected."""
    return LoraforgeError(f"{what} is a reward model (stage rm: a one-number score head in place of lm_head): it "
                          "scores text and does not generate, so it is not chatted with, merged or exported for llama.cpp — "
                          "score with `loraforge score RUN --data FILE -o scores.jsonl`")


def resolve_model(ref: str | Path, base: str | Path | None = None, cwd: Path | None = None) -> ModelRef:
    """Turn a model reference into a ModelRef; `base` overrides an adapter's recorded base. `cwd`:
    the folder an adapter's relative base path was recorded from (the training's working directory;
    default: this process's)."""
    path = Path(ref).expanduser()
    if not path.exists():
        if path.suffix.lower() == ".gguf":
            raise LoraforgeError(f"no such GGUF file: {ref}")
        raise LoraforgeError(f"no such model directory: {ref} — pass a HF model directory, an adapter directory "
                             "(with adapter_config.json) or a .gguf file (loraforge does not download models)")
    path = path.resolve()
    if path.is_file():
        return _gguf(path)
    if (path / "adapter_config.json").exists():
        return _adapter(path, base, cwd)
    if (path / "config.json").exists():
        if base is not None:
            raise LoraforgeError(f"--base {base} only applies to an adapter directory; {path} is a full model")
        names = read_json(path / "config.json").get("architectures") or []
        if any(name.endswith("ForSequenceClassification") for name in names):
            raise reward_model_error(f"{path} ({', '.join(names)})")
        if not any((path / w).exists() for w in _WEIGHTS):
            raise LoraforgeError(f"{path} has config.json but no weights ({' or '.join(_WEIGHTS[:2])}): "
                                 "copy the model's weight files into it")
        return ModelRef("hf", path, path, (), path)
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" It holds {ggufs[0].name}: pass that file." if ggufs else ""
    raise LoraforgeError(f"{path}: not a model directory — no config.json (a HF model) or adapter_config.json "
                         f"(a peft adapter).{hint}")


def _gguf(path: Path) -> ModelRef:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise LoraforgeError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); a model "
                             "reference is a HF model directory, an adapter directory or a .gguf file")
    return ModelRef("gguf", path, None, (), None)


def _adapter(path: Path, base: str | Path | None, cwd: Path | None = None) -> ModelRef:
    def recorded_path(value: str | None) -> Path | None:
        if not value:
            return None
        folder = Path(value).expanduser()
        return cwd / folder if cwd is not None and not folder.is_absolute() else folder

    chain = [path]
    config = read_json(path / "adapter_config.json")
    if config.get("task_type") == "SEQ_CLS":
        raise reward_model_error(str(path))
    recorded = config.get("base_model_name_or_path")
    if base is not None:
        base_dir = Path(base).expanduser()
        check_model_dir(base, "--base")
        if not (base_dir / "config.json").exists():
            raise LoraforgeError(f"--base {base}: no config.json there — pass the HF base model directory "
                                 f"that {path.name} was trained on")
        base_dir = base_dir.resolve()
    else:
        base_dir = recorded_path(recorded)
        # a base that is itself an adapter run (sft on top of pt): follow it to the real model
        while base_dir is not None and (base_dir / "adapter_config.json").exists() and len(chain) < _MAX_CHAIN:
            chain.insert(0, base_dir.resolve())
            base_dir = recorded_path(read_json(base_dir / "adapter_config.json").get("base_model_name_or_path"))
        if base_dir is None or not (base_dir / "config.json").exists():
            where = f"names its base '{recorded}', which is not a model directory here" if recorded else \
                "names no base (base_model_name_or_path is empty)"
            raise LoraforgeError(f"{path / 'adapter_config.json'} {where}: pass --base PATH with the base "
                                 "model directory it was trained on (nothing is downloaded)")
        base_dir = base_dir.resolve()
    tokenizer = next((a for a in reversed(chain) if (a / "tokenizer_config.json").exists()), base_dir)
    return ModelRef("adapter", path, base_dir, tuple(chain), tokenizer)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def context_length(ref: ModelRef) -> int | None:
    """The trained context window from config.json (GGUFs carry theirs; llama.cpp reads it)."""
    if ref.config_dir is None:
        return None
    config = read_json(ref.config_dir / "config.json")
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
