"""SFT packing: a packed row trains exactly as its examples would one by one, in fewer rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraforge.data.dataset import build_examples
from loraforge.data.packing import pack_examples, pack_rows, packing_enabled
from loraforge.data.tokenize import IGNORE
from loraforge.errors import LoraforgeError
from loraforge.train.callbacks import read_log
from loraforge.train.run import PadCollator, load_tokenizer, packed_forward_inputs, pad_id, train

from conftest import sft_config


def test_rows_take_the_longest_example_that_still_fits():
    # worked by hand: 6 fills with 2; 5 with 3; 4 is left alone; ties go to the earlier example
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack_rows([4, 4, 4], 8) == [[0, 1], [2]]
    with pytest.raises(LoraforgeError, match="cutoff_len"):
        pack_rows([3, 9], 8)


@pytest.fixture(scope="module")
def bundled_examples(tiny_llama, tmp_path_factory):
    """The bundled Chinese instructions, tokenized as training does, learning the prompt too (so that a
    label leaking across a boundary would be a real token)."""
    config = sft_config(tiny_llama, tmp_path_factory.mktemp("unused"), "data.train_on_prompt=true",
                        "data.cutoff_len=512")
    tokenizer = load_tokenizer(config)
    examples, _ = build_examples(config, tokenizer)
    return examples, tokenizer


def test_boundaries_restart_positions_and_mask_the_first_label(bundled_examples):
    examples, _ = bundled_examples
    packed = pack_examples(examples, 512)
    assert len(packed) < len(examples) / 2  # 160–296-token examples, ~2 per row
    assert sorted(i for row in packed.members for i in row) == list(range(len(examples)))
    for r in range(len(packed)):
        start = 0
        for index in packed.members[r]:
            ids = examples.input_ids[index]
            end = start + len(ids)
            assert packed.input_ids[r][start:end] == ids
            assert packed.position_ids[r][start:end] == list(range(len(ids)))
            assert packed.labels[r][start] == IGNORE  # not the target of the previous example's last token
            assert packed.labels[r][start + 1:end] == ids[1:]  # train_on_prompt: every other token is learned
            start = end
        assert start == len(packed.input_ids[r]) <= 512


def _model(path, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_packed_batch_matches_each_example_alone(arch, attn, bundled_examples, request):
    """Logits at every real position and each example's loss, packed (2 rows) vs alone."""
    examples, tokenizer = bundled_examples
    model = _model(request.getfixturevalue(arch), attn)
    shortest = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))[:6]
    chosen = examples.subset(shortest)  # 160–169 tokens: 3 to a 512-token row
    packed = pack_examples(chosen, 512)
    assert len(packed) == 2 and min(len(m) for m in packed.members) >= 3
    batch = PadCollator(pad_id(tokenizer))([packed[r] for r in range(len(packed))])
    assert (batch["attention_mask"] == 0).any()  # the shorter rows are padded too
    with torch.no_grad():
        out = model(**packed_forward_inputs(batch))
        leaky = model(**{k: v for k, v in batch.items() if k != "position_ids"}).logits  # control: no boundaries
    total_loss, total_targets, worst_leak = 0.0, 0, 0.0
    for r, members in enumerate(packed.members):
        start = 0
        for index in members:
            ids = torch.tensor([chosen.input_ids[index]])
            labels = torch.tensor([chosen.labels[index]])
            with torch.no_grad():
                alone = model(input_ids=ids, labels=labels)
            end = start + ids.shape[1]
            torch.testing.assert_close(out.logits[r, start:end], alone.logits[0], atol=2e-5, rtol=1e-4)
            worst_leak = max(worst_leak, (leaky[r, start:end] - alone.logits[0]).abs().max().item())
            targets = packed.labels[r][start + 1:end]
            loss = F.cross_entropy(out.logits[r, start:end - 1], torch.tensor(targets), ignore_index=IGNORE)
            torch.testing.assert_close(loss, alone.loss, atol=1e-5, rtol=1e-5)
            total_loss += alone.loss.item() * sum(t != IGNORE for t in targets)
            total_targets += sum(t != IGNORE for t in targets)
            start = end
    # the batch loss the Trainer optimises is the token-weighted mean of the examples' own losses
    assert out.loss.item() == pytest.approx(total_loss / total_targets, rel=1e-5)
    assert worst_leak > 1e-3  # the same rows without position_ids do let examples see each other


def test_packed_run_trains_on_fewer_rows_and_counts_real_tokens(tiny_llama, tmp_path, capsys):
    out = tmp_path / "packed"
    config = sft_config(tiny_llama, out, "data.neat_packing=true", "data.cutoff_len=512", "data.val_size=16", "train.epochs=4",
                        "train.lr=3e-3", "method=full", "train.logging_steps=1")
    assert config.data.neat_packing and packing_enabled(config)
    result = train(config)
    printed = capsys.readouterr().out
    assert "packing: 159 examples → " in printed and "attention kept within each example" in printed
    assert result.train_examples == 159 and result.train_rows < 159 / 2
    rows = read_log(out / "trainer_log.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert result.steps == len(losses) == 4 * -(-result.train_rows // 8)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert result.eval_loss is not None  # eval rows are packed too
    # include_num_input_tokens_seen="non_padding": 4 epochs of the training examples' real tokens
    examples, _ = build_examples(config, load_tokenizer(config))
    from loraforge.data.dataset import split_eval

    train_set, _ = split_eval(examples, 16, config.train.seed)
    assert rows[-1]["tokens_seen"] == 4 * sum(len(ids) for ids in train_set.input_ids)


def test_packing_is_refused_where_it_cannot_keep_examples_apart(tiny_llama, tmp_path):
    with pytest.raises(LoraforgeError, match="method: prompt_tuning"):
        packing_enabled(sft_config(tiny_llama, tmp_path, "data.packing=true", "method=prompt_tuning"))
    with pytest.raises(LoraforgeError, match="stage: sft"):
        packing_enabled(sft_config(tiny_llama, tmp_path, "packing=true", "stage=dpo"))
    assert not packing_enabled(sft_config(tiny_llama, tmp_path, "data.packing=true", "stage=pt"))  # pt packs already


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_a_preference_run_with_packing_is_refused_before_anything_is_written(tiny_llama, tmp_path, stage):
    from loraforge.train.run import train

    out = tmp_path / "run"
    with pytest.raises(LoraforgeError, match=f"data.neat_packing=true is for stage: sft; stage: {stage}"):
        train(sft_config(tiny_llama, out, "data.neat_packing=true", f"stage={stage}"))
    assert not out.exists()
