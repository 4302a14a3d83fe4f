"""`loraforge export imatrix`: an importance matrix from the user's own text, no llama.cpp binary.

What llama.cpp's `llama-imatrix` collects (tools/imatrix/imatrix.cpp, `collect_imatrix`), and
what this module computes the same way on the transformers model (base + adapters merged):

- for every matrix multiplication whose weight is named `blk.*` — in a LLaMA block
  attn_q/k/v/output and ffn_gate/up/down — and `output.weight` only when asked
  (`--process-output`; off by default there too: an importance matrix rarely helps the output
  layer), the sum over tokens of the squared input activation, per input column
  (`acc[j] += x[j] * x[j]`), and a count of the tokens that went in;
- over the text cut into non-overlapping chunks of `n_ctx` tokens (default 512), the first
  token of each chunk replaced by BOS where the model adds one, every token of a chunk counted;
- stored as a GGUF with `general.type = imatrix`, per tensor `<name>.in_sum2` (F32, ne =
  [columns, 1]) and `<name>.counts` (F32, ne = [1, 1]), the keys `imatrix.datasets` (the text
  file), `imatrix.chunk_count` and `imatrix.chunk_size` — the file `export gguf --imatrix`
  and llama.cpp's `llama-quantize --imatrix` read (`load_imatrix` divides sum by count).

The importance is per *input column*. The q/k permutation export applies for llama.cpp
reorders the *output rows* of attn_q/attn_k only, so column j of the GGUF tensor is column j
of the HF weight and the vectors need no permutation.

One difference from llama-imatrix: the activations come from the fp32 transformers model, not
from llama.cpp running an F16 (or already quantized) GGUF — the quantity llama.cpp means, without
its rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.export.arch import gguf_name

DEFAULT_CHUNK = 512  # llama-imatrix's default context


@dataclass
class ImatrixResult:
    path: Path
    entries: int
    chunks: int
    chunk_size: int
    tokens: int
    seconds: float


def text_chunks(ids: list[int], n_ctx: int, bos_id: int | None, max_chunks: int = 0) -> list[list[int]]:
    """llama.cpp's chunking (imatrix and perplexity alike): non-overlapping `n_ctx`-token pieces,
    the remainder dropped, the first token of each replaced by BOS when the model adds one."""
    count = len(ids) // n_ctx
    if max_chunks:
        count = min(count, max_chunks)
    chunks = [list(ids[i * n_ctx:(i + 1) * n_ctx]) for i in range(count)]
    if bos_id is not None:
        for chunk in chunks:
            chunk[0] = bos_id
    return chunks


def merged_model(base_dir: Path, adapter_dirs: list[Path]):
    """transformers fp32 with every adapter merged in order: plain nn.Linear layers, named as in the base."""
    from loraforge.eval.parity import reference_model

    model = reference_model(base_dir, adapter_dirs)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def collect_sums(model, chunks: list[list[int]], process_output: bool = False, progress=None) -> dict:
    """GGUF tensor name → (sum of squared inputs per column, float64; token count), over `chunks`."""
    import torch

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().to(torch.float64).reshape(-1, inputs[0].shape[-1])
            sq = (x * x).sum(0).numpy()
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = gguf_name(f"{module_name}.weight")
        if name and (name.startswith("blk.") or (process_output and name == "output.weight")):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
                if progress:
                    progress(len(chunk))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name], counts[name]) for name in sorted(sums)}


def write_imatrix(out_path: Path, stats: dict, dataset: str, chunks: int, chunk_size: int) -> Path:
    """llama.cpp's imatrix GGUF (see the module docstring), under a temporary name until complete."""
    import gguf

    from loraforge.outputs import new_file

    with new_file(Path(out_path)) as tmp:
        # GGUFWriter always adds general.architecture; llama.cpp's loader reads only the tensors and imatrix.* keys
        writer = gguf.GGUFWriter(tmp, "imatrix")
        try:
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", [dataset])
            writer.add_uint32("imatrix.chunk_count", chunks)
            writer.add_uint32("imatrix.chunk_size", chunk_size)
            for name, (sq, count) in stats.items():
                writer.add_tensor(f"{name}.in_sum2", sq.astype(np.float32).reshape(1, -1))
                writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path)


def compute_imatrix(model: str | Path, text_file: Path, out_path: Path, adapters: list[Path] = (),
                    n_ctx: int = DEFAULT_CHUNK, max_chunks: int = 0, process_output: bool = False) -> ImatrixResult:
    """Compute the importance matrix of `model` (+ `adapters`, merged in order) over `text_file`
    and write it to `out_path` in llama.cpp's imatrix GGUF format."""
    from tqdm import tqdm

    from loraforge.eval.ppl import read_text_file
    from loraforge.models import resolve_model
    from loraforge.tokenizer import load_chain_tokenizer

    ref = resolve_model(model)
    if ref.kind == "gguf":
        raise LoraforgeError(f"{ref.path}: export imatrix reads the HF model (and adapters) the GGUF is exported "
                             "from — pass that directory, not a .gguf")
    adapter_dirs = [*ref.adapter_dirs, *[Path(a) for a in adapters]]
    if Path(out_path).suffix != ".gguf":
        raise LoraforgeError(f"-o {out_path}: the imatrix is written as GGUF, name it *.gguf")
    if n_ctx < 16:  # llama.cpp skips matrix products over fewer than 16 tokens
        raise LoraforgeError(f"--ctx {n_ctx}: chunks need at least 16 tokens (llama-imatrix ignores shorter batches)")
    text = read_text_file(text_file)
    tokenizer = load_chain_tokenizer(ref.base_dir, adapter_dirs)
    ids = tokenizer.encode(text, add_special_tokens=True)
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None
    chunks = text_chunks(ids, n_ctx, bos, max_chunks)
    if not chunks:
        raise LoraforgeError(f"{text_file} is {len(ids)} tokens, shorter than one chunk of --ctx {n_ctx}: pass more "
                             f"text or a smaller --ctx (e.g. {max(16, len(ids) // 2)})")
    started = time.perf_counter()
    net = merged_model(ref.base_dir, adapter_dirs)
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit and n_ctx > limit:
        raise LoraforgeError(f"--ctx {n_ctx} is longer than the model's {limit} positions: choose --ctx {limit} or less")
    with tqdm(total=sum(map(len, chunks)), desc="imatrix", unit="tok") as bar:
        stats = collect_sums(net, chunks, process_output, bar.update)
    out = write_imatrix(out_path, stats, str(text_file), len(chunks), n_ctx)
    return ImatrixResult(out, len(stats), len(chunks), n_ctx, sum(map(len, chunks)), time.perf_counter() - started)
