"""Meta's original LLaMA checkpoint as a base: `consolidated.*.pth` + `params.json`, read directly.

The inverse of `export/pth.py`: Meta names (`layers.N.attention.wq.weight`, …) become HF
names, q/k rows go from Meta's interleaved rotary pairs back to HF's rotate-half order
(per key/value head for wk), and a HF `config.json` is synthesized from `params.json`
and the tensors' own shapes. No converted copy is written: `MetaCheckpoint` has the
same `keys/shape/dtype_name/read` interface as a safetensors shard, so the one stream
reads it tensor by tensor.

Model-parallel releases (13B: `consolidated.00.pth`, `.01.pth`; 70B: eight) split each
matrix across files as fairscale's layers did: column-parallel wq/wk/wv/w1/w3/output by
rows, row-parallel wo/w2 by columns, LLaMA-1/2's `ParallelEmbedding` by columns and
Llama-3's `VocabParallelEmbedding` by rows (told apart by the part's width), norms
replicated — the rule llama.cpp's `convert_legacy_llama.py` follows. The parts are
joined per block of rows as they are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError
from loraforge.export.shards import PickleShard

GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
               "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
               "post_attention_layernorm": "ffn_norm"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_GLOBAL = {meta: hf for hf, meta in GLOBAL_NAMES.items()}
_HF_MODULE = {meta: hf for hf, meta in LAYER_NAMES.items()}
_NOT_WEIGHTS = re.compile(r"(^|\.)rope\.freqs$")  # LLaMA-1 saved its rotary table; it is recomputed from theta
_BY_COLUMNS = ("attention.wo.weight", "feed_forward.w2.weight")  # fairscale RowParallelLinear
# params.json keys that change nothing here (context and batch are Meta's run-time limits) or that are
# checked against the tensors; any other key could change the computation and is refused
_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
           "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor", "max_seq_len",
           "max_batch_size"}


def meta_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    match = _HF_LAYER.match(hf_name)
    if match and match[2] in LAYER_NAMES:
        return f"layers.{match[1]}.{LAYER_NAMES[match[2]]}.weight"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise LoraforgeError(f"tensor {hf_name} has no place in Meta's LLaMA checkpoint — merge with --format hf")


def hf_name(meta: str, where: Path) -> str | None:
    """The HF name of a Meta tensor; None for tensors HF does not keep."""
    if meta in _HF_GLOBAL:
        return _HF_GLOBAL[meta]
    if _NOT_WEIGHTS.search(meta):
        return None
    match = _META_LAYER.match(meta)
    if match and match[2] in _HF_MODULE:
        return f"model.layers.{match[1]}.{_HF_MODULE[match[2]]}.weight"
    raise LoraforgeError(f"{where}: tensor {meta} is not part of Meta's LLaMA layout — is this a LLaMA checkpoint? "
                         "(convert it to HF safetensors with the model's own tools)")


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Meta's interleaved rotary rows (x0, x1), (x2, x3)… per head → HF's rotate-half order; the
    inverse of `arch.permute_qk`."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def meta_hidden(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """The feed-forward width Meta's `FeedForward` builds from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def is_meta_dir(folder: Path) -> bool:
    return (Path(folder) / "params.json").exists() and any(Path(folder).glob("consolidated.*.pth"))


class MetaCheckpoint:
    """`consolidated.*.pth` parts read under HF names and in HF's q/k order."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("consolidated.*.pth"))
        numbers = [f.name.removeprefix("consolidated.").removesuffix(".pth") for f in files]
        if numbers != [f"{i:02d}" for i in range(len(files))]:
            raise LoraforgeError(f"{self.folder}: model-parallel parts {', '.join(f.name for f in files)} are not "
                                 "numbered consolidated.00.pth, .01.pth, … without gaps — copy the missing part")
        self.files = files
        self.params = _read_params(self.folder / "params.json")
        self.parts = [PickleShard(f) for f in files]
        first = self.parts[0]
        self.names: dict[str, str] = {}  # HF name → Meta name
        self.axis: dict[str, int | None] = {}  # Meta name → axis the parts split, None: replicated / one part
        for meta in first.keys():
            name = hf_name(meta, files[0])
            if name is None:
                continue
            self.names[name] = meta
            self.axis[meta] = self._split_axis(meta)
        self.dim, self.n_heads = self.params["dim"], self.params["n_heads"]
        self.n_kv_heads = self.params.get("n_kv_heads") or self.n_heads
        self.head_dim = self.dim // self.n_heads

    def _split_axis(self, meta: str) -> int | None:
        shapes = []
        for part, path in zip(self.parts, self.files):
            if meta not in part.entries:
                raise LoraforgeError(f"{path}: has no {meta}, which {self.files[0].name} has — the model-parallel "
                                     "parts come from different checkpoints")
            shapes.append(part.shape(meta))
        if len(self.parts) == 1 or len(shapes[0]) < 2:
            return None
        if meta.startswith("tok_embeddings."):
            return 1 if shapes[0][1] * len(shapes) == self.params["dim"] else 0
        return 1 if meta.endswith(_BY_COLUMNS) else 0

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, name: str) -> list[int]:
        meta = self.names[name]
        shape = self.parts[0].shape(meta)
        axis = self.axis[meta]
        if axis is not None:
            shape[axis] = sum(part.shape(meta)[axis] for part in self.parts)
        return shape

    def dtype_name(self, name: str) -> str:
        return self.parts[0].dtype_name(self.names[name])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor in HF layout, or rows [start, stop) of it."""
        heads = {"self_attn.q_proj": self.n_heads, "self_attn.k_proj": self.n_kv_heads}
        module = name.removesuffix(".weight").split(".", 3)[-1] if name.startswith("model.layers.") else ""
        if module not in heads:
            return self._read_meta(self.names[name], rows)
        # q/k: the interleaved order is a reordering within each head, so read whole heads
        total = self.shape(name)[0]
        start, stop = rows or (0, total)
        stop = min(stop, total)
        first, last = start // self.head_dim * self.head_dim, -(-stop // self.head_dim) * self.head_dim
        block = self._read_meta(self.names[name], (first, last))
        return unpermute_qk(block, (last - first) // self.head_dim)[start - first:stop - first]

    def _read_meta(self, meta: str, rows: tuple[int, int] | None) -> torch.Tensor:
        axis = self.axis[meta]
        if axis is None:
            return self.parts[0].read(meta, rows)
        if axis == 1:
            return torch.cat([part.read(meta, rows) for part in self.parts], dim=1)
        per_part = self.parts[0].shape(meta)[0]
        start, stop = rows or (0, per_part * len(self.parts))
        pieces = [part.read(meta, (max(start, i * per_part) - i * per_part, min(stop, (i + 1) * per_part) - i * per_part))
                  for i, part in enumerate(self.parts) if start < (i + 1) * per_part and stop > i * per_part]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def config(self) -> dict:
        """A HF LlamaForCausalLM config.json for these weights, every size checked against the tensors."""
        params, where = self.params, self.folder / "params.json"
        dim, heads, kv_heads, head_dim = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        if dim % heads:
            raise LoraforgeError(f"{where}: dim {dim} is not a multiple of n_heads {heads}")
        layers = 1 + max((int(m[1]) for n in self.names if (m := _HF_LAYER.match(n))), default=-1)
        if layers != params["n_layers"]:
            raise LoraforgeError(f"{where}: n_layers is {params['n_layers']} but {self.files[0].name} holds "
                                 f"{layers} layers — params.json belongs to another checkpoint")
        vocab, width = self.shape("model.embed_tokens.weight")
        if width != dim:
            raise LoraforgeError(f"{where}: dim {dim} but tok_embeddings is {vocab}×{width}")
        if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab:
            raise LoraforgeError(f"{where}: vocab_size {params['vocab_size']} but tok_embeddings has {vocab} rows — "
                                 "params.json belongs to another checkpoint")
        wk = self.shape("model.layers.0.self_attn.k_proj.weight")[0]
        if wk != kv_heads * head_dim:
            raise LoraforgeError(f"{where}: n_kv_heads {kv_heads} (×{head_dim}) but wk has {wk} rows — set n_kv_heads "
                                 f"to {wk // head_dim}")
        ffn = self.shape("model.layers.0.mlp.gate_proj.weight")[0]
        expected = meta_hidden(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
        if ffn != expected:
            raise LoraforgeError(f"{where}: multiple_of/ffn_dim_multiplier give a feed-forward width of {expected} but "
                                 f"w1 has {ffn} rows — params.json belongs to another checkpoint")
        theta = float(params.get("rope_theta") or 10000.0)
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "rms_norm_eps": float(params.get("norm_eps", 1e-5)), "vocab_size": vocab,
            "max_position_embeddings": context_length(params), "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"},  # transformers 5's spelling
            "dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
                self.dtype_name("model.embed_tokens.weight"), "float32"),
            **special_ids(self.folder / "tokenizer.model"),
        }
        if params.get("use_scaled_rope"):
            # llama-models' apply_scaling: low_freq_factor 1 and an 8192 original context are constants there
            config["rope_parameters"] = {
                "rope_theta": theta, "rope_type": "llama3", "factor": float(params.get("rope_scaling_factor") or 8.0),
                "low_freq_factor": 1.0, "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
                "original_max_position_embeddings": 8192}
        return config


def _read_params(path: Path) -> dict:
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    params = {key: value for key, value in params.items() if value is not None}
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise LoraforgeError(f"{path}: {', '.join(f'{k}={params[k]!r}' for k in unknown)} — loraforge reads only "
                             "LLaMA-1/2/3's params.json; a key it does not know may change the model's computation, "
                             "so it is not ignored. Convert the checkpoint to HF safetensors with the model's own tools")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise LoraforgeError(f"{path}: no {key} — not a LLaMA params.json")
    return params


def context_length(params: dict) -> int:
    """params.json has no context length (Meta's `max_seq_len` is a run-time argument): the
    family's trained one, told apart by Meta's own params (norm_eps 1e-6 is LLaMA-1's)."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072  # Llama-3.1 / 3.2
    if float(params.get("rope_theta") or 10000.0) >= 500000:
        return 8192  # Llama-3
    return 2048 if float(params.get("norm_eps", 1e-5)) == 1e-6 else 4096  # LLaMA-1 / LLaMA-2


def special_ids(tokenizer_model: Path) -> dict:
    """bos/eos ids from a SentencePiece tokenizer.model beside the weights (LLaMA's 1/2 otherwise)."""
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    if tokenizer_model.exists():
        try:
            from loraforge.vocab.spm import load_proto

            spec = load_proto(tokenizer_model).trainer_spec
            ids = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id}
        except Exception:  # noqa: BLE001 — Llama-3's tokenizer.model is tiktoken's, not a proto
            pass
    return ids
