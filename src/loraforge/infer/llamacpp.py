"""Answer prompts with llama.cpp (llama-cpp-python) from a GGUF file.

The prompt is rendered with the template the model was trained with, the same function
training used, so an exported model is asked exactly what the trained one was.
`LlamaCppEngine` is the `llamacpp` engine of `infer/engine.py`; `load_gguf` /
`greedy_answer_gguf` are the plain greedy helpers the demo and the export tests use.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.data.records import Turn
from loraforge.data.templates import Template
from loraforge.env import usable_cpus
from loraforge.errors import LoraforgeError


class UnsupportedOption(LoraforgeError):
    """A generation option llama.cpp cannot honour. It fails every request alike, so a caller
    looping over a prompts file reports it as the flag it is, not as the line it stopped on."""


def check_supported(config) -> None:
    given = [f"--{name.replace('_', '-')} {value}" for name, value, default in
             (("num_beams", config.num_beams, 1), ("no_repeat_ngram_size", config.no_repeat_ngram_size, 0))
             if value != default]
    if given:
        raise UnsupportedOption(f"{' and '.join(given)}: transformers-only parameters (llama.cpp has no beam "
                                "search or n-gram ban) — drop the flag, or use --engine hf with a model directory")


def load_gguf(path: Path, n_ctx: int = 0):
    """n_ctx 0: the context the model was trained with (more makes llama.cpp warn of overflow)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)


def llama_tokenize(llm):
    """llama-cpp-python's tokenizer as `prompt_token_ids` calls it (control tokens in the text parsed)."""
    return lambda text, add_special: llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


def greedy_answer_gguf(llm, template: Template, question: str, system: str | None = None,
                       max_new_tokens: int = 64) -> str:
    eos = llm.detokenize([llm.token_eos()]).decode("utf-8", errors="replace")
    bos = llm.detokenize([llm.token_bos()]).decode("utf-8", errors="replace")
    from loraforge.infer.engine import prompt_token_ids, turns_prompt

    prompt = turns_prompt(template, system, [Turn("user", question)], eos, bos)
    ids = prompt_token_ids(prompt, llama_tokenize(llm), bos)
    out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                stop=list(template.stop_strings) or None)
    return out["choices"][0]["text"]


# ---------------------------------------------------------------- the llama.cpp engine


class LlamaCppEngine:
    """A .gguf under llama.cpp: the chat template and the end-of-generation tokens come from the file."""

    name = "llamacpp"

    def __init__(self, ref, adapters=(), n_ctx: int | None = None, template: str | None = None):
        import llama_cpp

        from loraforge.data.templates import get_template, jinja_template
        from loraforge.errors import LoraforgeError
        from loraforge.infer.engine import template_stop_strings

        if ref.kind != "gguf":
            base = ref.base_dir
            adapters_arg = f" --adapter {','.join(str(a) for a in ref.adapter_dirs)}" if ref.adapter_dirs else ""
            raise LoraforgeError(f"{ref.path} is a HF {'adapter' if ref.kind == 'adapter' else 'model'} directory: "
                                 f"llama.cpp needs a .gguf — export it first (loraforge export gguf --base {base}"
                                 f"{adapters_arg} --quant q8_0 -o model.gguf), or use --engine hf")
        if len(adapters) > 1:
            raise LoraforgeError("llama.cpp applies one LoRA adapter .gguf here; merge the others first "
                                 "(loraforge export gguf --adapter A1,A2) or serve them with --engine vllm")
        lora = str(Path(adapters[0]).resolve()) if adapters else None
        if lora and not Path(lora).is_file():
            raise LoraforgeError(f"{lora}: no such llama.cpp adapter file (write one with loraforge export lora-gguf)")
        self.model_name = ref.name
        threads = usable_cpus()
        try:
            self.llm = llama_cpp.Llama(model_path=str(ref.path), n_ctx=n_ctx or 0, n_threads=threads,
                                       n_threads_batch=threads, n_gpu_layers=-1, lora_path=lora, verbose=False)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise LoraforgeError(f"{ref.path}: llama.cpp cannot load it ({exc})") from None
        # llama.cpp pads the context to a multiple of 256, but llama-cpp-python's token buffer
        # keeps the size asked for: that is the window (a longer prompt would overflow it)
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        meta = self.llm.metadata
        self.chat_template = jinja_template(get_template(template)) if template else meta.get("tokenizer.chat_template")
        vocab = self.llm._model
        self.piece = token_piece(vocab.vocab)
        self.token_bytes = self.piece  # token id → bytes, as HFEngine.token_bytes
        self.bos_token, self.eos_token = (self.piece(t, special=True).decode("utf-8", "replace") if t >= 0 else ""
                                          for t in (self.llm.token_bos(), self.llm.token_eos()))
        self.stop_strings = template_stop_strings(self.chat_template)
        self.stop_ids = {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab.vocab, t)}
        for marker in self.stop_strings:  # a template end marker that is one special token stops as an id
            ids = self.llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1 and not self.piece(ids[0]):
                self.stop_ids.add(ids[0])

    def tokenize(self, prompt) -> list[int]:
        from loraforge.infer.engine import prompt_token_ids

        return prompt_token_ids(prompt, llama_tokenize(self.llm), self.bos_token)

    def render(self, messages):
        from loraforge.infer.engine import render_chat

        return render_chat(self.chat_template, messages, self.bos_token, self.eos_token)

    def stream(self, request, config):
        import llama_cpp

        from loraforge.infer.engine import ByteText, check_fits, prompt_ids, stream_tokens

        check_supported(config)
        ids = prompt_ids(self, request)
        check_fits(len(ids), self.n_ctx)
        self.llm.set_seed(config.seed if config.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        # temperature 0 is llama.cpp's greedy sampler; top_k 0 disables top-k there as in transformers
        tokens = self.llm.generate(ids, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                                   typical_p=config.typical_p, temp=config.temperature,
                                   repeat_penalty=config.repetition_penalty, presence_penalty=config.presence_penalty,
                                   frequency_penalty=config.frequency_penalty)
        text = ByteText()
        return stream_tokens(_within(tokens, self.n_ctx - len(ids)), lambda t: text(self.piece(t)),
                             text.flush, self.stop_ids, (*self.stop_strings, *config.stop), config.max_new_tokens)

    def complete(self, request, config):
        from loraforge.infer.engine import complete_from_stream

        return complete_from_stream(self, request, config)

    def close(self) -> None:
        self.llm.close()


def token_piece(vocab):
    """token id → its bytes as llama.cpp writes it (control tokens empty unless `special`).

    llama-cpp-python's token_to_piece returns its whole 32-byte buffer, NULs included."""
    import ctypes

    import llama_cpp

    buffer = ctypes.create_string_buffer(256)

    def piece(token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n] if n >= 0 else b""

    return piece


def _within(tokens, room: int):
    """At most `room` tokens: llama.cpp's generate() does not stop at the end of the context."""
    try:
        for _, token in zip(range(room), tokens):
            yield token
    finally:
        tokens.close()
