"""Records → token ids and labels.

SFT: a conversation is rendered by its template into segments. For loraforge's templates
the first segment is encoded as a whole text (the tokenizer adds BOS), every later one as
a *continuation* (no SentencePiece dummy `▁` in front of it). That keeps the ids of a
prompt in training identical to the ids the same prompt gets at inference, where it is
encoded alone and the model continues from its last token — `### Response: ` ends in a
lone `▁` there, so it must end in one here too.

LLaMA-Factory's templates (`Template.slots`) are encoded as LLaMA-Factory encodes them
(its `Template._convert_elements_to_ids`): every segment alone, with
`tokenizer.encode(segment, add_special_tokens=False)`, BOS/EOS pieces as their ids, and no
BOS but the template's own. On a SentencePiece vocabulary each segment then starts with a
dummy `▁` that a one-text encoding of the same string has not, so those ids are reached
at inference only by encoding the prompt the same way (`encode_prompt_turns`).

Labels: -100 everywhere but the answers (each answer ends with the template's end
token, so the model learns to stop); `train_on_prompt` learns everything,
`mask_history` only the last answer (LLaMA-Factory's: and with train_on_prompt the prompts too).

PT: texts get BOS and EOS, are concatenated and cut into `block_size` blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import Template, prompt_segments, render_segments

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


def encode_segments(
    tokenizer, segments: list[tuple[str, bool]], *, slots: bool = False
) -> tuple[list[int], list[bool]]:
    """Ids for consecutive text segments, with a learned-flag per id. `slots`: the template's
    `slots` — each segment encoded alone, as LLaMA-Factory does."""
    ids: list[int] = []
    learned: list[bool] = []
    for index, (text, is_answer) in enumerate(segments):
        if slots:
            piece = slot_ids(tokenizer, text)
        elif index == 0:
            piece = tokenizer.encode(text, add_special_tokens=True)
        else:
            after = _trailing_special(tokenizer, segments[index - 1][0]) or _ANCHOR
            piece = continuation_ids(tokenizer, text, after)
        ids.extend(piece)
        learned.extend([is_answer] * len(piece))
    return ids, learned


def slot_ids(tokenizer, text: str) -> list[int]:
    """One slot's ids as LLaMA-Factory gets them: its BOS/EOS pieces are the token ids, any
    other text `tokenizer.encode(text, add_special_tokens=False)`."""
    for token, token_id in ((tokenizer.bos_token, tokenizer.bos_token_id), (tokenizer.eos_token, tokenizer.eos_token_id)):
        if token and text == token and token_id is not None:
            return [token_id]
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt_turns(
    tokenizer, template: Template, system: str | None, turns: list[Turn], *, tools: str | None = None
) -> list[int]:
    """The generation prompt's ids exactly as training encoded that prompt: one text with
    the tokenizer's BOS for loraforge's templates, slot by slot for LLaMA-Factory's."""
    segments = prompt_segments(template, system, turns, tokenizer.eos_token or "",
                               bos_token=tokenizer.bos_token or "", tools=tools)
    return encode_segments(tokenizer, segments, slots=template.slots)[0]


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
    """Token ids and labels for one conversation; None if truncation leaves nothing to learn.

    Longer than `cutoff_len`: loraforge's templates keep the start; LLaMA-Factory's are cut
    as it cuts them (`_cut_like_llama_factory`)."""
    segments = render_segments(template, conv, tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "")
    ids, learned = encode_segments(tokenizer, segments, slots=template.slots)
    full_length = len(ids)
    rounds = _rounds(ids, learned)
    if template.slots:
        ids, labels = _cut_like_llama_factory(rounds, cutoff_len, train_on_prompt, mask_history)
    else:
        ids, labels = [], []
        for index, (prompt, answer) in enumerate(rounds):
            learn = not mask_history or index == len(rounds) - 1
            ids += prompt + answer
            labels += (prompt if train_on_prompt else [IGNORE] * len(prompt))
            labels += answer if (learn or train_on_prompt) else [IGNORE] * len(answer)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE for label in labels):
        return None
    return Encoded(ids, labels, full_length)


def _rounds(ids: list[int], learned: list[bool]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each round: a run of unlearned ids and the learned run after it."""
    rounds: list[tuple[list[int], list[int]]] = []
    for token, keep in zip(ids, learned):
        if not rounds or (not keep and rounds[-1][1]):
            rounds.append(([], []))
        rounds[-1][1 if keep else 0].append(token)
    return rounds


def _cut_like_llama_factory(
    rounds: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's SupervisedDatasetProcessor: rounds are taken in order (last first under
    mask_history, which learns only the last answer) while room is left, each prompt and
    answer shortened by its `infer_seqlen` share of what remains."""
    ids: list[int] = []
    labels: list[int] = []
    total = 0
    order = list(enumerate(rounds))
    for turn, (prompt, answer) in (order[::-1] if mask_history else order):
        if total >= cutoff_len:
            break
        prompt_len, answer_len = _llama_factory_lengths(len(prompt), len(answer), cutoff_len - total)
        prompt, answer = prompt[:prompt_len], answer[:answer_len]
        total += prompt_len + answer_len
        prompt_labels = prompt if train_on_prompt else [IGNORE] * prompt_len
        answer_labels = answer if (not mask_history or turn == len(rounds) - 1) else [IGNORE] * answer_len
        if mask_history:
            ids, labels = prompt + answer + ids, prompt_labels + answer_labels + labels
        else:
            ids, labels = ids + prompt + answer, labels + prompt_labels + answer_labels
    return ids, labels


def _llama_factory_lengths(prompt_len: int, answer_len: int, room: int) -> tuple[int, int]:
    """Its `infer_seqlen`: a short answer is kept whole, else a short prompt, else both shrink
    in proportion."""
    if answer_len * 2 < room:
        max_answer = room
    elif prompt_len * 2 < room:
        max_answer = room - prompt_len
    else:
        max_answer = int(room * (answer_len / (prompt_len + answer_len)))
    answer_len = min(max_answer, answer_len)
    return min(max(room - answer_len, 0), prompt_len), answer_len


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
