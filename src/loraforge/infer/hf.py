"""Answer prompts with transformers (+ peft for an unmerged adapter).

A run directory is enough: its tokenizer carries the trained template, its
adapter_config.json names the base model. `HFEngine` is the `hf` engine of
`infer/engine.py` (streaming, every sampling parameter); `load_model` /
`greedy_answer` / `exact_matches` are the plain greedy helpers the demo and the
training tests use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import Template, get_template
from loraforge.data.tokenize import continuation_ids, encode_prompt_turns
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import TokenizerPrompts
from loraforge.tokenizer import is_sentencepiece, load_chain_tokenizer, load_tokenizer


def template_of(run_dir: Path) -> Template:
    """The template a run was trained with, from its loraforge.yaml."""
    import yaml

    saved = Path(run_dir) / "loraforge.yaml"
    if not saved.exists():
        raise LoraforgeError(f"{run_dir} has no loraforge.yaml: not a loraforge run directory")
    data = yaml.safe_load(saved.read_text(encoding="utf-8"))["data"]
    return get_template(data["template"], tool_format=data.get("tool_format"), enable_thinking=data.get("enable_thinking"))


def load_model(path: Path):
    """A model dir, or an adapter dir whose adapter_config.json names its base."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        from peft import PeftModel

        base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        tokenizer = load_chain_tokenizer(Path(base), [path])
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, path)
    else:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def greedy_answer(model, tokenizer, template: Template, question: str, system: str | None = None,
                  max_new_tokens: int = 64) -> str:
    ids = torch.tensor([encode_prompt_turns(tokenizer, template, system, [Turn("user", question)])])
    stops = {tokenizer.eos_token_id}
    if template.end_token:
        stops.update(continuation_ids(tokenizer, template.end_token)[:1])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(t for t in stops if t is not None),
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def exact_matches(model, tokenizer, template: Template, conversations: list[Conversation],
                  max_new_tokens: int = 64) -> list[tuple[str, str, str]]:
    """(question, expected, generated) for single-turn conversations."""
    rows = []
    for conv in conversations:
        question, answer = conv.turns[-2].text, conv.turns[-1].text
        got = greedy_answer(model, tokenizer, template, question, conv.system, max_new_tokens)
        rows.append((question, answer, got))
    return rows


# ---------------------------------------------------------------- the transformers engine


class _PresenceFrequency:
    """OpenAI's presence/frequency penalties over the generated tokens (transformers has none)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def logits_processors(config, prompt_len: int):
    """transformers' own processors for our parameters, in generate()'s order: penalties, then warpers."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    out = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        out.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.presence_penalty or config.frequency_penalty:
        out.append(_PresenceFrequency(prompt_len, config.presence_penalty, config.frequency_penalty))
    if not config.greedy:
        out.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            out.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            out.append(TopPLogitsWarper(config.top_p))
        if config.min_p > 0:
            out.append(MinPLogitsWarper(config.min_p))
        if config.typical_p < 1.0:
            out.append(TypicalLogitsWarper(config.typical_p))
    return out


class _TextDelta:
    """Generated ids → new text, decoding a short window that starts in the prompt.

    Decoding the answer's ids alone would drop a SentencePiece token's leading space
    (the decoder strips it at the start of a text); llama.cpp's pieces keep it. A window
    that starts a few prompt tokens back keeps it too, and text is only released once it
    no longer ends in U+FFFD, the mark of an incomplete UTF-8 byte sequence.
    """

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer, self.ids = tokenizer, list(context[-4:])
        self.prefix, self.read = 0, len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def _delta(self, final: bool) -> str:
        before, now = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self, cut: bool = False) -> str:
        """What is held back; `cut` (a length stop): without the U+FFFD of a character whose
        last bytes were never generated."""
        text = self._delta(final=True)
        return text.rstrip("\ufffd") if cut else text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer):
    """token id → its bytes as llama.cpp writes the same token, or None for a decoder we do not know.

    Decoding a window of ids instead (`_TextDelta`) is not byte-exact: a stray byte token that is
    no UTF-8 becomes one U+FFFD per byte in tokenizers' ByteFallback, one per invalid run in
    Python and llama.cpp — and greedy text must be the same in both engines.
    """
    decoder = "▁" if is_sentencepiece(tokenizer) else \
        json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"), ensure_ascii=False)
    special = set(tokenizer.all_special_ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens
    if '"ByteLevel"' in decoder:
        alphabet = _byte_level_alphabet()

        def piece_bytes(piece: str) -> bytes:
            return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
    elif "▁" in decoder or '"Metaspace"' in decoder:  # SentencePiece: ▁ for a space, <0xNN> for a byte
        def piece_bytes(piece: str) -> bytes:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode()
    else:
        return None

    def of(token: int) -> bytes:
        if token in special:
            return b""  # control tokens are not text (llama.cpp: special=False)
        if token in added:
            return added[token].encode()
        return piece_bytes(pieces(token))

    return of


def _vocab_rows(adapter_dir: Path) -> int | None:
    """Rows of a full embed_tokens the adapter carries (an extended vocabulary), else None."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if "embed_tokens" in key and "lora_" not in key:
                return handle.get_slice(key).get_shape()[0]
    return None


class HFEngine(TokenizerPrompts):
    """transformers (+ peft) on CPU or CUDA: earlier adapters merged in order, the last one live."""

    name = "hf"

    def __init__(self, ref, adapters=(), n_ctx: int | None = None, template: str | None = None,
                 device: str | None = None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from loraforge.data.templates import jinja_template
        from loraforge.infer.engine import END_OF_GENERATION_TOKENS, template_stop_strings
        from loraforge.models import context_length

        if ref.kind == "gguf":
            raise LoraforgeError(f"{ref.path} is a GGUF file: the transformers engine needs a HF model or adapter "
                                 "directory — use --engine llamacpp (the default for .gguf)")
        self.model_name = ref.name
        adapter_dirs = [*ref.adapter_dirs, *(Path(a).resolve() for a in adapters)]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self.tokenizer = load_chain_tokenizer(ref.base_dir, adapter_dirs)
        model = AutoModelForCausalLM.from_pretrained(ref.base_dir, dtype=dtype)
        self.live_prompt_method = False
        for index, adapter in enumerate(adapter_dirs):
            rows = _vocab_rows(adapter)
            if rows and rows != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(rows, mean_resizing=False)  # peft overwrites the rows
            model = PeftModel.from_pretrained(model, adapter)
            lora = model.peft_config["default"].peft_type.value in ("LORA", "ADALORA")
            if index < len(adapter_dirs) - 1:
                if not lora:
                    raise LoraforgeError(f"{adapter}: a {model.peft_config['default'].peft_type.value} adapter can "
                                         "only be the last one (it cannot be merged under the next)")
                model = model.merge_and_unload()
            else:
                self.live_prompt_method = not lora
        self.model = model.to(self.device).eval()
        self.n_ctx = n_ctx or context_length(ref) or 2048
        saved = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else None
        self.chat_template = jinja_template(get_template(template)) if template else saved
        self.token_bytes = token_bytes(self.tokenizer)
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        self.stop_strings = template_stop_strings(self.chat_template)
        self.stop_ids = {self.tokenizer.eos_token_id} - {None}
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)  # Llama-3 lists <|eot_id|> here
        self.stop_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for token_id, token in self.tokenizer.added_tokens_decoder.items():
            if token.special and token.content in END_OF_GENERATION_TOKENS:
                self.stop_ids.add(token_id)
        for marker in self.stop_strings:  # an end marker that is one token stops as an id too
            ids = self.tokenizer.encode(marker, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in self.tokenizer.all_special_ids + list(self.tokenizer.added_tokens_decoder):
                self.stop_ids.add(ids[0])

    def stream(self, request, config):
        from loraforge.infer.engine import ByteText, check_fits, prompt_ids, stream_tokens

        ids = prompt_ids(self, request)
        check_fits(len(ids), self.n_ctx)
        budget = min(config.max_new_tokens, self.n_ctx - len(ids))
        if config.num_beams > 1 or self.live_prompt_method:
            tokens = iter(self._generate(ids, config, budget))
        else:
            tokens = self._sample(ids, config, budget)
        if self.token_bytes is not None:
            text = ByteText()
            to_text, flush = (lambda t: text(self.token_bytes(t))), text.flush
        else:
            delta = _TextDelta(self.tokenizer, ids)
            to_text, flush = delta, delta.flush
        return stream_tokens(tokens, to_text, flush, self.stop_ids, (*self.stop_strings, *config.stop),
                             config.max_new_tokens)

    def complete(self, request, config):
        from loraforge.infer.engine import complete_from_stream

        return complete_from_stream(self, request, config)

    def close(self) -> None:
        self.model = None

    def _generator(self, config) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
        return generator

    @torch.no_grad()
    def _sample(self, ids: list[int], config, budget: int):
        """Token by token with the KV cache: transformers' processors, our sampler (a seeded generator)."""
        processors = logits_processors(config, len(ids))
        generator = self._generator(config)
        seen = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=seen, use_cache=True)
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)
        key = "cache" if hasattr(out, "cache") else "past_key_values"
        for _ in range(budget):
            scores = processors(seen, out.logits[:, -1, :].float())
            if config.greedy:
                token = scores.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)
            yield int(token)
            seen = torch.cat([seen, token], dim=1)
            out = self.model(input_ids=token, use_cache=True, **{key: getattr(out, key)})

    @torch.no_grad()
    def _generate(self, ids: list[int], config, budget: int) -> list[int]:
        """transformers' generate(): beam search, and prompt-learning adapters (virtual tokens)."""
        from transformers.generation.logits_process import LogitsProcessorList

        if config.seed is not None:
            torch.manual_seed(config.seed)
        extra = LogitsProcessorList()
        if config.presence_penalty or config.frequency_penalty:
            extra.append(_PresenceFrequency(len(ids), config.presence_penalty, config.frequency_penalty))
        sampling = {} if config.greedy else {
            "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
            "min_p": config.min_p or None, "typical_p": config.typical_p}
        seen = torch.tensor([ids], device=self.device)
        out = self.model.generate(
            input_ids=seen, attention_mask=torch.ones_like(seen), max_new_tokens=budget,
            do_sample=not config.greedy, num_beams=config.num_beams, repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size or None, logits_processor=extra,
            eos_token_id=sorted(self.stop_ids), pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **sampling)
        return out[0, len(ids):].tolist()
