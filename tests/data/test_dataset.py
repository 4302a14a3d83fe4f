"""The tokenized-data cache: reused when nothing changed, never when something did."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from loraforge.data.dataset import build_examples, split_eval
from loraforge.errors import LoraforgeError

from conftest import sft_config

RECORDS = [{"instruction": f"问题{i}：天空是什么颜色？", "input": "", "output": f"蓝色{i}。"} for i in range(10)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False))
    return path


def build(tiny_llama, tmp_path, data_file, *overrides):
    config = sft_config(tiny_llama, tmp_path / "out", f"data.datasets={data_file}",
                        f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    return build_examples(config, AutoTokenizer.from_pretrained(tiny_llama))


def test_unchanged_inputs_hit_the_cache_with_the_same_ids(tiny_llama, tmp_path, data_file):
    first, stats1 = build(tiny_llama, tmp_path, data_file)
    again, stats2 = build(tiny_llama, tmp_path, data_file)
    assert (stats1.from_cache, stats2.from_cache) == (False, True)
    assert again.input_ids == first.input_ids and again.labels == first.labels
    assert stats2.records == 10


@pytest.mark.parametrize("change", ["data", "template", "cutoff", "train_on_prompt"])
def test_any_change_misses_the_cache(tiny_llama, tmp_path, data_file, change):
    build(tiny_llama, tmp_path, data_file)
    overrides = []
    if change == "data":
        data_file.write_text(json.dumps(RECORDS[:-1] + [{**RECORDS[-1], "output": "绿色。"}], ensure_ascii=False))
    else:
        overrides = {"template": ["data.template=alpaca"], "cutoff": ["data.cutoff_len=1000"],
                     "train_on_prompt": ["data.train_on_prompt=true"]}[change]
    examples, stats = build(tiny_llama, tmp_path, data_file, *overrides)
    assert not stats.from_cache


def test_eval_split_is_deterministic_and_disjoint(tiny_llama, tmp_path, data_file):
    examples, _ = build(tiny_llama, tmp_path, data_file)
    train_a, eval_a = split_eval(examples, 0.2, seed=1)
    train_b, eval_b = split_eval(examples, 0.2, seed=1)
    assert eval_a.input_ids == eval_b.input_ids and len(eval_a) == 2 and len(train_a) == 8
    assert not {tuple(x) for x in eval_a.input_ids} & {tuple(x) for x in train_a.input_ids}
    with pytest.raises(LoraforgeError, match="nothing left to train on"):
        split_eval(examples, 10, seed=1)


def test_a_damaged_cache_entry_is_rebuilt(tiny_llama, tmp_path, data_file):
    first, _ = build(tiny_llama, tmp_path, data_file)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"not an npz")
    again, stats = build(tiny_llama, tmp_path, data_file)
    assert not stats.from_cache and again.input_ids == first.input_ids
