"""Per-request sampling and the text a request streams back.

Each request gets its own llama.cpp sampler chain, so requests decoded in the same batch
keep their own temperature, penalties and random generator (a seed makes a request
reproducible whatever else is being decoded with it). The chain's order is llama.cpp's
common one: penalties → top-k → typical → top-p → min-p → temperature → draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraforge.infer.engine import ByteText, StopFilter

PENALTY_LAST_N = 64  # tokens the repetition penalties look back over (llama.cpp's default)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until the end of generation or the context is full
    temperature: float = 1.0  # 0 → greedy (the model's most likely token every step)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = field(default_factory=frozenset)  # e.g. a template's end token
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    grammar: str | None = None  # GBNF the answer must follow (response_format), root rule "root"


def sampler_chain(lib, params: SamplingParams, n_vocab: int, vocab=None):
    """A llama.cpp sampler chain for one request; free it with `lib.llama_sampler_free`.
    `vocab` (a llama_vocab pointer) is needed only for a grammar."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        lib.llama_sampler_chain_add(chain, sampler)

    if params.grammar is not None:
        # First, so every later sampler sees only tokens the grammar allows (-inf for the
        # rest); the chain's accept advances the grammar with each drawn token.
        grammar = lib.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not grammar:
            lib.llama_sampler_free(chain)
            raise ValueError("llama.cpp could not parse the response_format grammar")
        add(grammar)

    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        add(lib.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                                             params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0.0:
        add(lib.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(lib.llama_sampler_init_top_k(params.top_k))
    if params.typical_p < 1.0:
        add(lib.llama_sampler_init_typical(params.typical_p, 1))
    if params.top_p < 1.0:
        add(lib.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(lib.llama_sampler_init_min_p(params.min_p, 1))
    add(lib.llama_sampler_init_temp(params.temperature))
    seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    add(lib.llama_sampler_init_dist(seed))
    return chain


class TextStream:
    """Token bytes in, text out: whole UTF-8 characters only (a Chinese character is often
    split over two or three byte-level tokens), and never a prefix of a stop string that
    may still complete — the client must not see the start of a stop sequence. The same
    two rules as the chat engines' (`ByteText`, `StopFilter`)."""

    def __init__(self, stop: tuple[str, ...]):
        self._bytes = ByteText()
        self._stops = StopFilter(stop)
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to send."""
        if self.stopped:
            return ""
        text, self.stopped = self._stops.push(self._bytes(data))
        return text

    def finish(self, cut: bool = False) -> str:
        """The end of generation: flush what was held back (a stop prefix is just text now).
        `cut`: the answer ended by length, so held bytes are the start of a character that
        never came — dropped, not shown as U+FFFD (a truncated Chinese answer would end in
        a broken glyph)."""
        if self.stopped:
            return ""
        text, self.stopped = ("", False) if cut else self._stops.push(self._bytes.flush())
        return text + ("" if self.stopped else self._stops.flush())
