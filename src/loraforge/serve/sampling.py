"""Per-request sampling and the text a request streams back.

Each request gets its own llama.cpp sampler chain, so requests decoded in the same batch
keep their own temperature, penalties and random generator (a seed makes a request
reproducible whatever else is being decoded with it). The chain's order is llama.cpp's
common one: penalties → top-k → typical → top-p → min-p → temperature → draw.

Log-probabilities (`logprobs`) are the model's own distribution — the log-softmax of the
raw logits, before penalties, temperature, top-k/top-p and any grammar — as OpenAI and
llama-server (`post_sampling_probs: false`) report them; the chosen token is the one the
request's chain actually drew.
"""

from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loraforge.infer.engine import StopFilter

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
    logprobs: int | None = None  # None: none reported; N: each token's log-probability and the N likeliest


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token as `logprobs` reports it."""

    token: int
    data: bytes  # the token's bytes (a byte-fallback token may be part of a UTF-8 character)
    logprob: float
    top: tuple[tuple[int, bytes, float], ...]  # (id, bytes, logprob) of the likeliest, most likely first
    offset: int = 0  # characters of the answer before this token (the legacy `text_offset`)


def top_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of raw logits at `token`, and the `n_top` likeliest (id, logprob), ties by id."""
    x = logits.astype(np.float64)
    top = x.max()
    log_total = top + np.log(np.exp(x - top).sum())
    if n_top <= 0:
        return float(x[token] - log_total), []
    n_top = min(n_top, len(x))
    best = np.argpartition(-x, n_top - 1)[:n_top]
    best = sorted(best.tolist(), key=lambda i: (-x[i], i))
    return float(x[token] - log_total), [(i, float(x[i] - log_total)) for i in best]


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
    two rules as the chat engines' (`ByteText`, `StopFilter`).

    Tokens pushed with an `entry` (their logprobs) come back from `take` once all their text
    has been sent, with the character offset where it starts: a streamed chunk carries the
    entries of its own text, and tokens of a cut-off stop string, or of a character cut by
    `max_tokens`, never come back."""

    def __init__(self, stop: tuple[str, ...]):
        # ByteText's decoder, fed a byte at a time to know where each token's text starts
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopFilter(stop)
        self.stopped = False
        self._decoded = 0  # characters out of the UTF-8 decoder
        self._sent = 0  # characters released to the client
        self._undecoded: list[tuple[int, object]] = []  # (offset, entry) whose bytes made no character yet
        self._unsent: deque[tuple[int, int, object]] = deque()  # (offset, end, entry) not yet all sent

    def push(self, data: bytes, entry=None) -> str:
        """Add a token's bytes; return the text that is now safe to send."""
        if self.stopped:
            return ""
        if entry is None or not data:
            decoded = self._decoder.decode(data)
            if entry is not None:
                self._undecoded.append((self._decoded, entry))
            return self._release(decoded)
        first = self._decoder.decode(data[:1])
        # the characters the first byte lets out are earlier bytes' (a stray byte's U+FFFD), but
        # for the last one when this byte completed it; a byte still held starts a character
        offset = self._decoded + len(first) - (not self._holding())
        self._undecoded.append((offset, entry))
        return self._release(first + self._decoder.decode(data[1:]))

    def _holding(self) -> bool:
        return bool(self._decoder.getstate()[0])

    def _release(self, decoded: str) -> str:
        self._decoded += len(decoded)
        if not self._holding():  # every pushed token's bytes are in characters now: their text ends here
            self._unsent.extend((offset, self._decoded, entry) for offset, entry in self._undecoded)
            self._undecoded.clear()
        text, self.stopped = self._stops.push(decoded)
        self._sent += len(text)
        return text

    def take(self) -> list[tuple[int, object]]:
        """(offset, entry) of the pushed tokens whose text has now all been sent, in order."""
        ready = []
        while self._unsent and self._unsent[0][1] <= self._sent:
            offset, _, entry = self._unsent.popleft()
            ready.append((offset, entry))
        return ready

    def finish(self, cut: bool = False) -> str:
        """The end of generation: flush what was held back (a stop prefix is just text now).
        `cut`: the answer ended by length, so held bytes are the start of a character that
        never came — dropped, not shown as U+FFFD (a truncated Chinese answer would end in
        a broken glyph)."""
        if self.stopped:
            return ""
        text = "" if cut else self._release(self._decoder.decode(b"", final=True))
        if self.stopped:
            return text
        rest = self._stops.flush()
        self._sent += len(rest)
        return text + rest
