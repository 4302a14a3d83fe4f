"""Records → token ids and labels.

SFT: a conversation is rendered by its template into segments; the first segment is
encoded as a whole text (the tokenizer adds BOS), every later one as a *continuation*
(no SentencePiece dummy `▁` in front of it). That keeps the ids of a prompt in training
identical to the ids the same prompt gets at inference, where it is encoded alone and
the model continues from its last token — `### Response: ` ends in a lone `▁` there,
so it must end in one here too.

Labels: -100 everywhere but the answers (each answer ends with the template's end
token, so the model learns to stop); `train_on_prompt` learns everything,
`mask_history` only the last answer.

PT: texts get BOS and EOS, are concatenated and cut into `block_size` blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from loraforge.data.records import Conversation
from loraforge.data.templates import Template, render_segments

IGNORE = -100
_ANCHOR = "\n"  # encodes to its own token(s) in SentencePiece and byte-level BPE vocabularies


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # before truncation: what data check reports


def continuation_ids(tokenizer, text: str, after: str = _ANCHOR) -> list[int]:
    """Ids of `text` where it follows `after` in a longer text: no BOS, and no dummy-prefix
    `▁` unless the tokenizer would put one there (SentencePiece does after a special token,
    and so does llama.cpp)."""
    if not text:
        return []
    anchor = tokenizer.encode(after, add_special_tokens=False)
    ids = tokenizer.encode(after + text, add_special_tokens=False)
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return tokenizer.encode(text, add_special_tokens=False)


def _trailing_special(tokenizer, text: str) -> str | None:
    for token in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})):
        if token and text.endswith(token):
            return token
    return None


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Ids for consecutive text segments, with a learned-flag per id."""
    ids: list[int] = []
    learned: list[bool] = []
    for index, (text, is_answer) in enumerate(segments):
        if index == 0:
            piece = tokenizer.encode(text, add_special_tokens=True)
        else:
            after = _trailing_special(tokenizer, segments[index - 1][0]) or _ANCHOR
            piece = continuation_ids(tokenizer, text, after)
        ids.extend(piece)
        learned.extend([is_answer] * len(piece))
    return ids, learned


def is_truncated(enc: Encoded) -> bool:
    return enc.full_length > len(enc.input_ids)


def encode_conversation(
    tokenizer,
    template: Template,
    conv: Conversation,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Encoded | None:
    """Token ids and labels for one conversation; None if truncation leaves nothing to learn."""
    segments = render_segments(template, conv, tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "")
    if mask_history:
        last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
        segments = [(t, a and i == last) for i, (t, a) in enumerate(segments)]
    ids, learned = encode_segments(tokenizer, segments)
    labels = [tok if (train_on_prompt or keep) else IGNORE for tok, keep in zip(ids, learned)]
    full_length = len(ids)
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE for label in labels):
        return None
    return Encoded(ids, labels, full_length)


def encode_text_blocks(tokenizer, texts: Iterable[str], block_size: int) -> list[list[int]]:
    """Concatenate BOS+text+EOS and cut into `block_size` blocks (the last partial block is kept
    only when the whole corpus is shorter than one block)."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=True))
        if eos is not None:
            stream.append(eos)
    if len(stream) <= block_size:
        return [stream] if stream else []
    usable = len(stream) // block_size * block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]
