"""The initialisation claim, measured: new rows from their base pieces against random rows.

At the start of pt on the extended vocabulary, the tokens that are new (the targets the
base model could only write as several pieces) are predicted clearly better when their
rows start as the mean of their base pieces than when they start random. On this tiny
model the loss on the *old* targets goes up as much: new output rows that look like
their pieces take probability from them, so the whole-text loss is not lower than with
random rows (see the printed figures and the README) — the issue's whole-text claim does
not hold at this scale.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.vocab.resize import grow_embeddings

from conftest import DATA_DIR


def held_out_losses(model, tokenizer, n_base: int) -> dict[str, float]:
    """Mean next-token cross-entropy on the held-out lines: all targets, old ids, new ids."""
    lines = [line for line in (DATA_DIR / "zh_heldout.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    sums = {"all": [0.0, 0], "old": [0.0, 0], "new": [0.0, 0]}
    model.eval()
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tokenizer(line).input_ids[:256]])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            nll = -logp[torch.arange(len(targets)), targets]
            for key, mask in (("all", targets >= 0), ("old", targets < n_base), ("new", targets >= n_base)):
                sums[key][0] += nll[mask].sum().item()
                sums[key][1] += int(mask.sum())
    return {key: total / max(count, 1) for key, (total, count) in sums.items()}


@pytest.mark.slow
def test_new_tokens_start_better_than_with_random_rows(small_base_pretrained, extended_tokenizer, capsys):
    tokenizer = AutoTokenizer.from_pretrained(extended_tokenizer)
    n_base = len(AutoTokenizer.from_pretrained(small_base_pretrained))
    ours = AutoModelForCausalLM.from_pretrained(small_base_pretrained, dtype=torch.float32)
    grow_embeddings(ours, small_base_pretrained, tokenizer)
    torch.manual_seed(0)
    random_rows = AutoModelForCausalLM.from_pretrained(small_base_pretrained, dtype=torch.float32)
    random_rows.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # N(0, 0.02): Chinese-LLaMA's resize

    losses = {name: held_out_losses(model, tokenizer, n_base) for name, model in (("pieces", ours),
                                                                                 ("random", random_rows))}
    with capsys.disabled():
        print("\nheld-out loss at the start of pt on the extended vocabulary (nats/token):")
        for name, row in losses.items():
            print(f"  {name:<7} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    # measured here: new 7.71 vs 7.90 (pieces vs random), old 8.09 vs 6.91, all 8.00 vs 7.14
    assert losses["pieces"]["new"] < losses["random"]["new"] - 0.1, losses
