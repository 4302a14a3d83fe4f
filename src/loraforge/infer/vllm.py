"""vLLM, optional, for users with GPUs (`pip install loraforge[vllm]`).

Two ways in. `vllm_serve_command` writes the `vllm serve` command line for a model
reference: the base model, the run's tokenizer (it carries the trained chat template),
and each adapter as a LoRA module (`--enable-lora --lora-modules name=path`) — vLLM's
OpenAI server then serves several adapters on one base, picked per request by model
name. `VllmEngine` is the in-process engine behind `--engine vllm` (vllm.LLM; it
returns whole answers, so its stream is one chunk of text at the end).

The mapping from our GenerationConfig is plain functions (`sampling_params_kwargs`,
`openai_request_params`), tested without vLLM installed. Parameters vLLM lacks are
refused rather than silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import Chunk, GenerationConfig, TokenizerPrompts

# vLLM allocates LoRA slots for one of these ranks (--max-lora-rank); 16 by default
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _refuse_unsupported(config: GenerationConfig) -> None:
    if config.typical_p != 1.0:
        raise LoraforgeError("vLLM has no typical_p sampling: leave it at 1, or use --engine hf / llamacpp")
    if config.num_beams > 1:
        raise LoraforgeError("beam search (num_beams > 1) is not mapped onto vLLM: use --engine hf")
    if config.no_repeat_ngram_size:
        raise LoraforgeError("vLLM has no no_repeat_ngram_size: use --engine hf")


def sampling_params_kwargs(config: GenerationConfig, stop_strings: Sequence[str] = (),
                           stop_token_ids: Sequence[int] = ()) -> dict:
    """Keyword arguments for vllm.SamplingParams equal to `config` (plus the template's stops)."""
    _refuse_unsupported(config)
    return {
        "n": 1,
        "max_tokens": config.max_new_tokens,
        "temperature": config.temperature,  # 0 is greedy in vLLM too
        "top_k": config.top_k if config.top_k > 0 else -1,  # vLLM: -1 = all tokens
        "top_p": config.top_p,
        "min_p": config.min_p,
        "repetition_penalty": config.repetition_penalty,
        "presence_penalty": config.presence_penalty,
        "frequency_penalty": config.frequency_penalty,
        "stop": [*stop_strings, *config.stop],
        "stop_token_ids": list(stop_token_ids),
        "seed": config.seed,
        "skip_special_tokens": True,
    }


def openai_request_params(config: GenerationConfig) -> dict:
    """The body of a request to `vllm serve`'s OpenAI API: standard fields, vLLM's extras beside them
    (the openai client passes those through `extra_body`)."""
    _refuse_unsupported(config)
    body = {"max_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
            "presence_penalty": config.presence_penalty, "frequency_penalty": config.frequency_penalty}
    if config.stop:
        body["stop"] = list(config.stop)
    if config.seed is not None:
        body["seed"] = config.seed
    extra = {"top_k": config.top_k if config.top_k > 0 else -1, "min_p": config.min_p,
             "repetition_penalty": config.repetition_penalty}
    return {**body, "extra_body": extra}


def _lora_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return max(ranks)


def vllm_serve_command(ref, lora_modules: Mapping[str, str | Path] | None = None, host: str = "127.0.0.1",
                       port: int = 8000, n_ctx: int | None = None, served_name: str | None = None) -> list[str]:
    """`vllm serve` arguments for a reference (an adapter's own LoRA included) and more named adapters."""
    if ref.kind == "gguf":
        raise LoraforgeError(f"{ref.path}: vLLM serves HF model directories here; serve a .gguf with "
                             "--engine llamacpp (loraforge serve)")
    modules = dict(lora_modules or {})
    if ref.kind == "adapter":
        if len(ref.adapter_dirs) > 1:
            raise LoraforgeError(f"{ref.path} sits on {len(ref.adapter_dirs) - 1} earlier adapter(s): vLLM applies "
                                 "one LoRA per request — merge the earlier ones into the base first (loraforge merge)")
        modules = {ref.name: ref.path, **modules}
    args = ["vllm", "serve", str(ref.base_dir), "--host", host, "--port", str(port),
            "--served-model-name", served_name or (ref.base_dir.name if modules else ref.name)]
    if ref.tokenizer_dir is not None:
        args += ["--tokenizer", str(ref.tokenizer_dir)]  # the run's tokenizer carries the trained chat template
    if n_ctx:
        args += ["--max-model-len", str(n_ctx)]
    if modules:
        for name, path in modules.items():
            if not (Path(path) / "adapter_config.json").exists():
                raise LoraforgeError(f"--lora-modules {name}={path}: no adapter_config.json there")
        rank = max(_lora_rank(Path(p)) for p in modules.values())
        slot = next((r for r in LORA_RANKS if r >= rank), None)
        if slot is None:
            raise LoraforgeError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]}): merge the adapter")
        args += ["--enable-lora", "--max-lora-rank", str(slot), "--max-loras", str(len(modules)),
                 "--lora-modules", *(f"{name}={Path(path)}" for name, path in modules.items())]
    return args


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise LoraforgeError("the vllm engine needs vLLM and a GPU: pip install 'loraforge[vllm]' "
                             "(or use --engine llamacpp / hf)") from None
    return vllm


class VllmEngine(TokenizerPrompts):
    """vllm.LLM in this process; answers come whole (no token stream)."""

    name = "vllm"

    def __init__(self, ref, adapters=(), n_ctx: int | None = None, template: str | None = None):
        from loraforge.data.templates import get_template, jinja_template
        from loraforge.infer.engine import template_stop_strings

        vllm = _import_vllm()
        command = vllm_serve_command(ref, {Path(a).name: a for a in adapters}, n_ctx=n_ctx)  # same checks
        self.model_name = ref.name
        self._lora = None
        kwargs = {"model": str(ref.base_dir), "tokenizer": str(ref.tokenizer_dir), "max_model_len": n_ctx}
        if "--enable-lora" in command:
            if len(command[command.index("--lora-modules") + 1:]) > 1:
                raise LoraforgeError("the in-process vllm engine applies one adapter; serve several with "
                                     + " ".join(command))
            from vllm.lora.request import LoRARequest

            path = command[-1].split("=", 1)[1]
            kwargs.update(enable_lora=True, max_lora_rank=int(command[command.index("--max-lora-rank") + 1]))
            self._lora = LoRARequest(Path(path).name, 1, path)
        self.llm = vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None})
        # prompt ids from loraforge's tokenizer (sentencepiece's for a SentencePiece vocabulary, as in
        # training); vLLM's own only turns the answer back into text
        from loraforge.tokenizer import load_chain_tokenizer

        self.tokenizer = load_chain_tokenizer(ref.base_dir, [*ref.adapter_dirs, *(Path(a) for a in adapters)])
        self.n_ctx = self.llm.llm_engine.model_config.max_model_len
        saved = getattr(self.tokenizer, "chat_template", None)
        self.chat_template = jinja_template(get_template(template)) if template else saved
        self.bos_token, self.eos_token = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        self.stop_strings = template_stop_strings(self.chat_template)
        self.stop_ids = {self.tokenizer.eos_token_id} - {None}  # vLLM stops there itself

    def stream(self, request, config):
        from vllm import SamplingParams

        from loraforge.infer.engine import check_fits, prompt_ids

        ids = prompt_ids(self, request)
        check_fits(len(ids), self.n_ctx)
        params = SamplingParams(**sampling_params_kwargs(config, self.stop_strings))
        output = self.llm.generate([{"prompt_token_ids": ids}], params, lora_request=self._lora)[0].outputs[0]
        finish = "length" if output.finish_reason == "length" else "stop"
        tokens = list(output.token_ids)
        for token in tokens[:-1]:
            yield Chunk("", token)
        yield Chunk(output.text, tokens[-1] if tokens else None, finish)

    def complete(self, request, config):
        from loraforge.infer.engine import complete_from_stream

        return complete_from_stream(self, request, config)

    def close(self) -> None:
        self.llm = None
