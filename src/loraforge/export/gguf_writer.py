"""`loraforge export gguf`: base + adapters → one GGUF file, in one streaming pass.

The GGUF header (metadata and every tensor's name, shape, type and size) is known from
the plan before any weight is read, so it is written first; then each merged tensor
from the shared stream is permuted (q/k), quantized with ggml's own kernels and
appended. No merged checkpoint, no F16 temporary, no llama.cpp binary. The file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loraforge.errors import LoraforgeError
from loraforge.export.arch import arch_of, extra_tensors, gguf_name, hyperparameters, to_gguf_layout
from loraforge.export.chain import check_chain
from loraforge.export.chat_template import chat_template_text, set_chat_template
from loraforge.export.config_table import check_config
from loraforge.export.imatrix import importance_for, load_imatrix
from loraforge.export.pipeline import Behind, ahead
from loraforge.export.quant import GGMLType, quantize, row_bytes
from loraforge.export.schemes import (
    FLOAT_TYPES,
    ModelFacts,
    Scheme,
    needs_imatrix,
    scheme_of,
    tensor_type,
)
from loraforge.export.vocab_meta import add_tokenizer
from loraforge.export.weights import (
    Planned,
    check_free_space,
    merged_chunks,
    merged_config,
    plan,
    read_adapter,
    tokenizer_source,
)
from loraforge.outputs import new_file

# rows are merged and quantized in blocks of at most this much fp32, whatever the tensor size
CHUNK_BYTES = 64 * 1024**2


def gguf_nbytes(item: Planned, kind: GGMLType) -> int:
    rows = int(np.prod(item.shape[:-1])) if len(item.shape) > 1 else 1
    return rows * row_bytes(kind, item.shape[-1])


def encode(tensor: torch.Tensor, kind: GGMLType, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    if kind == GGMLType.F32:
        return tensor.numpy().astype(np.float32, copy=False)
    if kind == GGMLType.F16:
        return tensor.numpy().astype(np.float16)
    return quantize(tensor.numpy().reshape(-1, tensor.shape[-1]), kind, imatrix=imatrix, name=name)


def importance_of(planned: list[Planned], names: dict[str, str], kinds: dict[str, GGMLType], scheme: Scheme,
                  imatrix: Path | None) -> dict[str, np.ndarray]:
    """Each quantized tensor's importance vector, all checked before anything is written:
    llama.cpp refuses the very-low-bit types without one, and a wrong-sized one means another model."""
    table = load_imatrix(imatrix) if imatrix else {}
    found = {}
    for item in planned:
        name, kind = names[item.name], kinds[item.name]
        if kind in FLOAT_TYPES:
            continue
        values = importance_for(table, name, item.shape[-1], imatrix)
        if values is not None:
            found[name] = values
        elif needs_imatrix(name, kind, scheme):
            where = f"{imatrix} has no entry for it" if imatrix else "no --imatrix was given"
            raise LoraforgeError(
                f"--quant {scheme.name} writes {name} as {kind.name}, which needs an importance matrix, and "
                f"{where}: compute one from your own text with `loraforge export imatrix MODEL --text calibration.txt "
                "-o imatrix.gguf` (no llama.cpp binary needed) or with llama.cpp's `llama-imatrix`, "
                "and pass --imatrix FILE, or choose a scheme that works without one (q4_k_m, iq4_xs, q3_k_m …)")
    return found


@contextmanager
def gguf_file(out_path: Path, arch_name: str) -> Iterator:
    """A GGUFWriter on a temporary name next to `out_path`, renamed only when the block completes."""
    import gguf

    with new_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        try:
            yield writer
        finally:
            writer.close()


def export_gguf(base_dir: Path, adapter_dirs: list[Path], out_path: Path, quant: str = "f16",
                imatrix: Path | None = None, *, force: bool = False, template: str | None = None) -> Path:
    """Write `out_path` (.gguf) from the base model and the adapters, applied in order;
    `template` (a name or Jinja file) replaces the chat template the tokenizer brings."""
    import gguf

    scheme = scheme_of(quant)
    adapters = [read_adapter(p) for p in adapter_dirs]
    planned = [p for p in plan(base_dir, adapters) if gguf_name(p.name)]
    check_chain(base_dir, adapter_dirs, adapters, force=force)
    template_text = chat_template_text(template) if template else None
    config = merged_config(base_dir, planned)
    arch = arch_of(config)
    check_config(config, f"{base_dir}/config.json", {p.name for p in planned})
    extra = extra_tensors(config)  # rope_freqs for llama3 rope
    out_path = Path(out_path)
    names = {p.name: gguf_name(p.name) for p in planned}
    facts = ModelFacts.of(config, arch.gguf_name, set(names.values()), has_imatrix=imatrix is not None)
    kinds = {p.name: tensor_type(names[p.name], p.shape, scheme, facts) for p in planned}
    importance = importance_of(planned, names, kinds, scheme, imatrix)
    check_free_space(out_path, sum(gguf_nbytes(p, kinds[p.name]) for p in planned))

    with gguf_file(out_path, arch.gguf_name) as writer:
        writer.add_name(Path(adapter_dirs[-1] if adapter_dirs else base_dir).name)
        writer.add_file_type(scheme.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        hyperparameters(writer, config)
        embed_rows = next(p.shape[0] for p in planned if p.name == "model.embed_tokens.weight")
        add_tokenizer(writer, tokenizer_source(base_dir, adapters), embed_rows,
                      fallbacks=[Path(base_dir), *(a.path for a in reversed(adapters))])
        if template_text:
            set_chat_template(writer, template_text)
        for name, data in extra.items():
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
        for item in planned:
            kind = kinds[item.name]
            writer.add_tensor_info(names[item.name], item.shape, np.dtype(np.float32), gguf_nbytes(item, kind),
                                   raw_dtype=gguf.GGMLQuantizationType(int(kind)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(math.prod(p.shape) for p in planned), unit="w", unit_scale=True,
                  desc=f"gguf {scheme.name}") as progress:
            fout, align = writer.fout[0], writer.data_alignment

            def put(job: tuple[np.ndarray, bool, int]) -> None:  # in file order, on the writer thread
                data, first, pad_after = job
                if first:
                    fout.write(bytes(-fout.tell() % align))
                data.tofile(fout)
                fout.write(bytes(pad_after))

            write = Behind(put)
            whole = lambda name: arch.permute_qk and (".q_proj." in name or ".k_proj." in name)  # noqa: E731
            try:
                for data in extra.values():
                    write((data, True, -data.nbytes % align))
                for item, start, rows in ahead(merged_chunks(planned, adapters, CHUNK_BYTES, whole)):
                    rows = to_gguf_layout(item.name, rows, arch, config)
                    name, kind = names[item.name], kinds[item.name]
                    last = start + (rows.shape[0] if item.shape else 1) == (item.shape[0] if item.shape else 1)
                    pad = -gguf_nbytes(item, kind) % align if last else 0
                    write((encode(rows, kind, name, importance.get(name)), start == 0, pad))
                    progress.update(rows.numel())
            finally:
                write.close()
    return out_path
