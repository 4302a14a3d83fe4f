"""SFT packing: several tokenized examples in one training row, each still on its own.

A padded batch spends compute on pad tokens: with examples of 40–250 tokens and
`cutoff_len` 256, a length-grouped batch is still a fifth padding, a random one half.
Packing fills each row with whole examples up to `cutoff_len` tokens instead — the same
greedy rule as LLaMA-Factory's `greedy_knapsack`: every row takes the longest example
that still fits, until none does.

A packed row must train exactly as its examples would one by one:

- `position_ids` restart at 0 at every example, so RoPE sees the positions it sees unpacked;
- no token attends across an example boundary: the collator hands the model these
  `position_ids` and no 2-D padding mask, and transformers (5.x, `masking_utils.
  find_packed_sequence_indices`) then builds a block-diagonal causal mask for eager, sdpa
  and flex attention alike (flash-attention reads the same position_ids as varlen
  boundaries). It does so only when the forward pass has no KV cache, so the trainer
  passes `use_cache=False` (`train/run.py`, `PackedTrainer`);
- the first token of every example has label -100: the model's labels are shifted by one,
  so otherwise the previous example's last token would learn to predict it — whatever
  `train_on_prompt` says. Unpacked, position 0 is never a target either, so the set of
  targets, and with it the loss, is the same.

LLaMA-Factory has two switches: `packing` (examples in a row attend to each other) and
`neat_packing` (they do not). loraforge accepts both names and gives both the second
meaning: cross-example attention only adds noise that unpacked training does not have.

Packing runs after the tokenized-data cache and the eval split: the cache keeps single
examples (one cache serves packed and unpacked runs) and eval examples never share a row
with training ones.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from loraforge.config import Config
from loraforge.data.tokenize import IGNORE
from loraforge.errors import LoraforgeError


def packing_enabled(config: Config) -> bool:
    """`data.packing` or `data.neat_packing` (LLaMA-Factory's two names; both mean attention kept within
    each example here). Refused where it cannot mean that."""
    if not (config.data.packing or config.data.neat_packing):
        return False
    if config.stage == "pt":
        return False  # pre-training text is already concatenated into full blocks: packing is what pt does
    key = "data.packing" if config.data.packing else "data.neat_packing"
    if config.stage != "sft":
        raise LoraforgeError(
            f"{key}=true is for stage: sft; stage: {config.stage} trains on pairs or scored answers, which are "
            f"batched as they are — drop {key}")
    if config.method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        # peft drops position_ids for virtual-token methods, and with them the example boundaries
        raise LoraforgeError(f"{key}=true cannot keep examples apart with method: {config.method} (peft ignores "
                             "position_ids for virtual tokens): use method: lora or full, or drop packing")
    return True


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row: every row takes the longest remaining example that fits its
    remaining room (ties: the earliest), until none fits. Rows come out fullest-first."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise LoraforgeError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than a packed row's "
                             f"{capacity} (data.cutoff_len): raise cutoff_len")
    # lengths are at most `capacity`, so a bucket per length keeps each pick at O(log capacity)
    buckets: dict[int, deque[int]] = {}
    for index, length in enumerate(lengths):
        buckets.setdefault(length, deque()).append(index)
    sizes = sorted(buckets)
    rows: list[list[int]] = []
    while sizes:
        row, room = [], capacity
        while (k := bisect.bisect_right(sizes, room) - 1) >= 0:
            size = sizes[k]
            row.append(buckets[size].popleft())
            room -= size
            if not buckets[size]:
                del sizes[k]
        rows.append(row)
    return rows


@dataclass
class PackedExamples:
    """Training rows of whole examples; `members[r]` are the indices (into the unpacked examples) in row r."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    members: list[list[int]]
    capacity: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "position_ids": self.position_ids[index]}

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.input_ids)

    def describe(self, unit: str = "examples") -> str:
        examples = sum(len(m) for m in self.members)
        fill = self.tokens / (len(self) * self.capacity) if len(self) else 0.0
        return (f"packing: {examples} {unit} → {len(self)} rows of ≤ {self.capacity} tokens "
                f"({fill:.0%} full, attention kept within each example)")


def pack_examples(examples, capacity: int) -> PackedExamples:
    """Concatenate tokenized examples (anything with `.input_ids` and `.labels` lists) into rows of at most
    `capacity` tokens, with per-example position_ids and the first label of every example masked."""
    rows = pack_rows([len(ids) for ids in examples.input_ids], capacity)
    packed = PackedExamples([], [], [], rows, capacity)
    for row in rows:
        ids, labels, positions = [], [], []
        for index in row:
            example_ids = examples.input_ids[index]
            ids.extend(example_ids)
            labels.append(IGNORE)  # never the target of the previous example's last token
            labels.extend(examples.labels[index][1:])
            positions.extend(range(len(example_ids)))
        packed.input_ids.append(ids)
        packed.labels.append(labels)
        packed.position_ids.append(positions)
    return packed
