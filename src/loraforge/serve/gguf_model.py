"""One GGUF model loaded once through llama.cpp's C API, and the contexts that share it.

The server needs what `llama_cpp.Llama` hides: several sequences in one KV cache, one
`llama_decode` for all of them, and one context per LoRA adapter (llama.cpp applies an
adapter to a whole context, so requests for different adapters cannot share a batch).
The weights are loaded once; every context points at the same `llama_model`.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError

GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h's enum ggml_log_level
_log_state = {"last": 0}


def _llama():
    import llama_cpp

    if "callback" not in _log_state:
        # llama.cpp's load chatter stays quiet; errors reach stderr. (llama-cpp-python's
        # own filter maps ggml's levels off by one and prints warnings as errors.)
        @llama_cpp.llama_log_callback
        def errors_only(level, text, user_data):
            level = _log_state["last"] if level == GGML_LOG_LEVEL_CONT else level
            _log_state["last"] = level
            if level == GGML_LOG_LEVEL_ERROR:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _log_state["callback"] = errors_only  # kept alive: llama.cpp holds a raw pointer to it
        llama_cpp.llama_log_set(errors_only, ctypes.c_void_p(0))
    return llama_cpp


def default_threads() -> tuple[int, int]:
    """Every CPU this process may run on, for one token and for prompt batches alike
    (llama-cpp-python takes half the cores for one token): the server's ThreadGovernor
    (serve/threads.py) gives cores back while other processes keep them busy."""
    from loraforge.serve.threads import usable_cpus

    cores = usable_cpus()
    return cores, cores


class GgufModel:
    """The weights and vocabulary of one .gguf file; tokenization and detokenization."""

    def __init__(self, path: Path):
        lib = _llama()
        self.lib = lib
        self.path = Path(path)
        if not self.path.is_file():
            raise LoraforgeError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise LoraforgeError(f"{self.path} is not a GGUF file (no GGUF magic); "
                                     "export one with `loraforge export gguf`")
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0 if not lib.llama_supports_gpu_offload() else -1
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise LoraforgeError(f"llama.cpp could not load {self.path} (truncated file, or an adapter GGUF "
                                 "rather than a model?); check it with `loraforge gguf inspect`")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self.bos_text = self._special_text(lib.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(lib.llama_vocab_eos(self.vocab))
        template = lib.llama_model_chat_template(self.model, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids as llama.cpp cuts them; control tokens written in the text are parsed
        (chat templates spell out their markup tokens)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, True)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; control tokens are empty unless `special` (they end a turn)."""
        key = token if not special else -token - 1
        cached = self._pieces.get(key)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            cached = self._pieces[key] = buf.raw[:n]
        return cached

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def single_token(self, text: str) -> int | None:
        """The id of `text` if it is exactly one token (a template's end marker), else None."""
        ids = self.tokenize(text, add_special=False)
        return ids[0] if len(ids) == 1 else None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None when the file has no such key)."""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, 256)
        if n < 0:
            return None
        if n >= 256:
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    def embedding_pooling(self) -> int:
        """How /v1/embeddings pools token vectors: the model's own `<arch>.pooling_type` when
        the GGUF declares mean, CLS or last-token pooling (embedding models do), else mean —
        a chat model declares none, and llama.cpp's "none" gives a vector per token."""
        lib = self.lib
        declared = self.meta(f"{self.meta('general.architecture')}.pooling_type")
        pooled = {lib.LLAMA_POOLING_TYPE_MEAN, lib.LLAMA_POOLING_TYPE_CLS, lib.LLAMA_POOLING_TYPE_LAST}
        if declared is not None and declared.isdigit() and int(declared) in pooled:
            return int(declared)
        return lib.LLAMA_POOLING_TYPE_MEAN

    @property
    def n_embd(self) -> int:
        """The length of one embedding vector."""
        return self.lib.llama_model_n_embd_out(self.model)

    def load_adapter(self, name: str, path: Path):
        path = Path(path)
        if path.is_dir():
            hint = (f"export it first: loraforge export lora-gguf --adapter {path} -o {path.name}.gguf"
                    if (path / "adapter_config.json").exists() else "pass a LoRA adapter .gguf file")
            raise LoraforgeError(f"--adapter {name}={path}: a directory, but a GGUF model needs a llama.cpp "
                                 f"LoRA GGUF; {hint}")
        if not path.is_file():
            raise LoraforgeError(f"--adapter {name}={path}: no such file")
        adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise LoraforgeError(f"--adapter {name}={path}: llama.cpp refused it as a LoRA for {self.path.name} "
                                 "(another base's adapter, or not an adapter GGUF; make one with "
                                 "`loraforge export lora-gguf`)")
        return adapter


@dataclass
class ContextSpec:
    parallel: int  # sequences (slots) in the one KV cache
    ctx_per_slot: int  # tokens each sequence may hold, prompt + answer
    n_batch: int  # most tokens one llama_decode takes
    threads: int
    threads_batch: int


def _apply_adapter(lib, ctx, adapter) -> None:
    """Apply one loaded LoRA adapter (scale 1) to a whole context."""
    adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)
    if lib.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
        raise LoraforgeError("llama.cpp could not apply the LoRA adapter to its context")


def _free(context) -> None:
    """Free a context's batch and llama.cpp context once (Context, EmbeddingContext)."""
    if context.ctx:
        context.lib.llama_batch_free(context.batch)
        context.lib.llama_free(context.ctx)
        context.ctx = None


class Context:
    """A llama.cpp context on the shared model: its KV cache holds `parallel` sequences."""

    def __init__(self, model: GgufModel, spec: ContextSpec, adapter=None):
        lib = model.lib
        self.lib = lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = spec.ctx_per_slot * spec.parallel
        params.n_batch = spec.n_batch
        params.n_ubatch = min(spec.n_batch, 512)
        params.n_seq_max = spec.parallel
        params.n_threads = spec.threads
        params.n_threads_batch = spec.threads_batch
        # One unified KV buffer for all sequences. Per-sequence streams (kv_unified=False)
        # measured 3x slower per step on CPU with 8 sequences (6.3 vs 2.1 ms, 4.4M model):
        # ggml's split-stream attention is not the fast path there. Each slot's share is
        # enforced here (`n_ctx_seq`), so the buffer never overflows.
        params.kv_unified = True
        # Flash attention off, as llama-cpp-python's Llama has it: llama.cpp's "auto" turns it
        # on for CPUs, and its F16 attention moves logits by up to 0.1 — enough to flip a
        # near-tie, so a served answer would differ from what `Llama` says for the same prompt.
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise LoraforgeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for "
                                 f"{spec.parallel} slots: lower --parallel or --ctx-size")
        if adapter is not None:
            _apply_adapter(lib, self.ctx, adapter)
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_ctx_seq = spec.ctx_per_slot  # tokens one sequence may hold
        self.n_batch = spec.n_batch
        self.batch = lib.llama_batch_init(spec.n_batch, 0, 1)
        self._seq_rows = [self.batch.seq_id[i] for i in range(spec.n_batch)]

    def clear_sequence(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give sequence `dst` the cells of `src`'s first n positions (shared, not copied,
        in a unified KV cache)."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def trim_sequence(self, seq: int, keep: int) -> bool:
        """Drop a sequence's cells from position `keep` on; False (and all dropped) where
        the memory cannot cut a sequence (recurrent models)."""
        if self.lib.llama_memory_seq_rm(self.memory, seq, keep, -1):
            return True
        self.clear_sequence(seq)
        return False

    def fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence, wants_logits) rows into the batch."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            self._seq_rows[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)

    def decode(self) -> int:
        return self.lib.llama_decode(self.ctx, self.batch)

    def logits(self, row: int) -> np.ndarray:
        """The raw logits of a batch row that asked for them; valid until the next decode."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, row), shape=(self.model.n_vocab,))

    def close(self) -> None:
        _free(self)


class EmbeddingContext:
    """A llama.cpp context that returns one pooled vector per input instead of logits, for
    /v1/embeddings. Its own context on the shared model: the decode thread's contexts and
    their KV caches are never touched, so embeddings do not stall or disturb generation."""

    def __init__(self, model: GgufModel, n_ctx: int, threads: int, adapter=None):
        lib = model.lib
        self.lib, self.model = lib, model
        params = lib.llama_context_default_params()
        # one input per decode, all of it in one ubatch: llama.cpp pools within a ubatch
        # (llama-server refuses an input longer than its physical batch for the same reason)
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = model.embedding_pooling()
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as `Llama(embedding=True)`, see Context
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise LoraforgeError(f"llama.cpp could not create an embedding context of {n_ctx} tokens")
        if adapter is not None:
            _apply_adapter(lib, self.ctx, adapter)
        self.n_ctx = n_ctx
        self.n_embd = model.n_embd
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def embed(self, ids: list[int]) -> np.ndarray:
        """The pooled, unnormalized vector of one input (at most n_ctx token ids)."""
        lib, batch = self.lib, self.batch
        lib.llama_memory_clear(self.memory, True)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True  # every token an output, as llama.cpp wants for pooled embeddings
        batch.n_tokens = len(ids)
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for an embedding input of {len(ids)} tokens")
        return np.ctypeslib.as_array(lib.llama_get_embeddings_seq(self.ctx, 0), shape=(self.n_embd,)).copy()

    def close(self) -> None:
        _free(self)


class Embedder:
    """/v1/embeddings on a GGUF: an EmbeddingContext per served name, made on first use (a
    server nobody asks for embeddings allocates nothing), one request at a time.

    `max_tokens` bounds an input: it is pooled in one ubatch, and without flash attention its
    attention scores take n_tokens² × n_head floats per layer (512 MB at 2048 tokens, 32 heads)."""

    def __init__(self, model: GgufModel, adapters: dict[str, object], max_tokens: int, threads: int):
        self.model = model
        self.adapters = adapters  # served name → its LoRA adapter (None for the base)
        self.max_tokens = max_tokens
        self.threads = threads
        self._contexts: dict[str, EmbeddingContext] = {}
        self._lock = threading.Lock()

    def check(self, inputs: list[list[int]]) -> None:
        """Refuse, before any work, an input that is empty, too long or not in the vocabulary."""
        n_vocab = self.model.n_vocab
        for i, ids in enumerate(inputs):
            if not ids:
                raise LoraforgeError(f"input {i} is empty: send some text (or token ids) to embed")
            if len(ids) > self.max_tokens:
                raise LoraforgeError(f"input {i} is {len(ids)} tokens but an embedding input may hold "
                                     f"{self.max_tokens} tokens on this server: shorten it or split it into "
                                     "several inputs")
            bad = next((t for t in ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise LoraforgeError(f"input {i}: token id {bad} is not in the vocabulary (0..{n_vocab - 1})")

    def embed(self, name: str, inputs: list[list[int]]) -> list[np.ndarray]:
        """One L2-normalized vector per input, as llama-server's /v1/embeddings returns them."""
        self.check(inputs)
        with self._lock:
            if name not in self.adapters:  # closed, or a name this server does not have
                raise LoraforgeError(f"unknown model '{name}': this server has {', '.join(self.adapters)}")
            context = self._contexts.get(name)
            if context is None:
                context = self._contexts[name] = EmbeddingContext(self.model, self.max_tokens, self.threads,
                                                                  self.adapters[name])
            vectors = [context.embed(ids) for ids in inputs]
        return [l2_normalized(v) for v in vectors]

    def close(self) -> None:
        with self._lock:
            for context in self._contexts.values():
                context.close()
            self._contexts.clear()
            self.adapters = {}


def l2_normalized(vector: np.ndarray) -> np.ndarray:
    """llama.cpp's `common_embd_normalize(…, 2)`: the Euclidean norm summed in double; a zero vector stays zero."""
    norm = float(np.sqrt(np.sum(vector.astype(np.float64) ** 2)))
    return (vector * np.float32(1.0 / norm)).astype(np.float32) if norm > 0 else vector
