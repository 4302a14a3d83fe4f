"""Preference data: LLaMA-Factory's ranking and KTO layouts, reward-scored answers, detection by
path, dataset_info.json's num_samples/split/subset, stage errors, ids equal to SFT's, data check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraforge.config import load_config
from loraforge.data.check import check_data, format_report
from loraforge.data.preference import prompt_and_answer
from loraforge.data.records import Conversation, Feedback, Preference, Turn
from loraforge.data.registry import load_datasets, resolve_datasets
from loraforge.data.templates import get_template
from loraforge.data.tokenize import IGNORE, encode_conversation, encode_prompt_turns
from loraforge.errors import LoraforgeError

# Entries copied in shape from LLaMA-Factory's data/dataset_info.json (dpo_zh_demo, dpo_en_demo,
# kto_en_demo, mllm_demo); the records are our own, written in those formats.
DATASET_INFO = {
    "dpo_zh_demo": {"file_name": "dpo_zh_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "dpo_alpaca": {"file_name": "dpo_alpaca.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                               "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"}},
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"}},
    "sft": {"file_name": "sft.json"},
    "scored": {"file_name": "scored.jsonl", "columns": {"prompt": "instruction", "query": "input",
                                                         "response": "output", "score": "reward_score"}},
    "dpo_sampled": {"file_name": "dpo_zh_demo.json", "ranking": True, "formatting": "sharegpt",
                    "num_samples": 5, "columns": {"chosen": "chosen", "rejected": "rejected"}},
    "dpo_sliced": {"file_name": "dpo_zh_demo.json", "ranking": True, "formatting": "sharegpt",
                   "split": "train[1:3]", "columns": {"chosen": "chosen", "rejected": "rejected"}},
    "dpo_parts_zh": {"file_name": "parts", "subset": "zh", "ranking": True, "formatting": "sharegpt",
                     "columns": {"chosen": "chosen", "rejected": "rejected"}},
}

ZH_PAIRS = [  # (question, chosen, rejected)
    ("你好", "您好，很高兴为您服务。", "有事快说。"),
    ("今天天气怎么样？", "您好，今天晴朗，适合出门。", "自己看窗外。"),
    ("推荐一本书", "您好，推荐您读《红楼梦》。", "不知道。"),
]


def sharegpt_pair(question, chosen, rejected, history=()):
    turns = [m for q, a in history for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return {"conversations": [*turns, {"from": "human", "value": question}],
            "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "dataset_info.json").write_text(json.dumps(DATASET_INFO), encoding="utf-8")
    write(tmp_path / "dpo_zh_demo.json",
          [sharegpt_pair(*ZH_PAIRS[0]), sharegpt_pair(*ZH_PAIRS[1], history=[("在吗", "在的。")]),
           sharegpt_pair(*ZH_PAIRS[2])])
    write(tmp_path / "dpo_alpaca.json", [{"instruction": "Translate to Chinese", "input": "thank you",
                                          "chosen": "谢谢你", "rejected": "thank you"}])
    write(tmp_path / "kto_en_demo.json", [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello!"}],
         "label": True},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Go away."}],
         "label": False}])
    write(tmp_path / "mllm_demo.json", [{"messages": [{"role": "user", "content": "<image>这是什么"},
                                                      {"role": "assistant", "content": "一只猫"}],
                                         "images": ["mllm_demo_data/1.jpg"]}])
    write(tmp_path / "sft.json", [{"instruction": "你好", "output": "您好"}])
    write(tmp_path / "scored.jsonl", [
        {"input": "写一句问候", "output": "您好！", "reward_score": 9},
        {"input": "写一句问候", "output": "嗯。", "reward_score": 2},
        {"input": "写一句问候", "output": "你好。", "reward_score": 6},
        {"input": "写一句问候", "output": "您好啊！", "reward_score": 9},
        {"input": "说再见", "output": "再见，祝您愉快。", "reward_score": 7}])
    write(tmp_path / "parts" / "dpo_en.json", [sharegpt_pair("hi", "Hello, glad to help.", "What.")])
    write(tmp_path / "parts" / "dpo_zh.json", [sharegpt_pair(*ZH_PAIRS[0])])
    return tmp_path


def load(data_dir, name, stage="dpo", **kwargs):
    [report] = load_datasets(resolve_datasets(data_dir, [name]), stage=stage, skip_invalid=False, **kwargs)
    return report


def test_sharegpt_ranking_entry_gives_pairs_with_history(data_dir):
    report = load(data_dir, "dpo_zh_demo")
    assert report.format == "sharegpt/ranking"
    assert all(isinstance(r, Preference) for r in report.records)
    assert [(r.prompt.turns[-1].text, r.chosen, r.rejected) for r in report.records] == ZH_PAIRS
    assert report.records[1].prompt.turns == (Turn("user", "在吗"), Turn("assistant", "在的。"),
                                              Turn("user", "今天天气怎么样？"))
    assert report.records[0].source == f"{data_dir / 'dpo_zh_demo.json'}:2"


def test_alpaca_ranking_entry_joins_instruction_and_input(data_dir):
    [pair] = load(data_dir, "dpo_alpaca").records
    assert pair.prompt.turns == (Turn("user", "Translate to Chinese\nthank you"),)
    assert (pair.chosen, pair.rejected) == ("谢谢你", "thank you")


def test_kto_entry_gives_feedback_with_its_label(data_dir):
    records = load(data_dir, "kto_en_demo", stage="kto").records
    assert [(type(r), r.conversation.turns[-1].text, r.desirable) for r in records] == [
        (Feedback, "Hello!", True), (Feedback, "Go away.", False)]


@pytest.mark.parametrize("file", ["dpo_zh_demo.json", "dpo_alpaca.json", "kto_en_demo.json"])
def test_named_by_path_reads_as_through_dataset_info(data_dir, file):
    """kto_en_demo.json by path used to load as SFT records and train on its label: false answers."""
    stage = "kto" if file.startswith("kto") else "dpo"
    by_path = load(None, str(data_dir / file), stage=stage).records
    by_name = load(data_dir, file.removesuffix(".json"), stage=stage).records
    assert by_path == by_name and by_path


def test_a_label_that_is_not_true_or_false_is_not_kto(data_dir):
    path = write(data_dir / "labelled.json", [{"instruction": "分类：苹果", "output": "水果", "label": "fruit"}])
    [record] = load(None, str(path), stage="sft").records
    assert record.turns[-1] == Turn("assistant", "水果")


def test_kto_data_by_path_is_refused_for_sft_naming_the_stage(data_dir):
    with pytest.raises(LoraforgeError, match=r"KTO feedback .* which stage sft does not train: train it with "
                                             r"stage: kto"):
        load(None, str(data_dir / "kto_en_demo.json"), stage="sft")


@pytest.mark.parametrize(("name", "stage", "message"), [
    ("dpo_zh_demo", "sft", r"dataset dpo_zh_demo is preference pairs .* train it with stage: dpo or rm"),
    ("sft", "dpo", r"dataset sft is instruction/chat data .*: use stage: sft for it"),
    ("kto_en_demo", "rm", r"stage: kto"),
    ("scored", "sft", r"reward-scored answers .* stage: dpo, rm or kto"),
])
def test_data_for_another_stage_names_the_stage_to_use(data_dir, name, stage, message):
    with pytest.raises(LoraforgeError, match=message):
        load(data_dir, name, stage=stage)


@pytest.mark.parametrize("by", ["name", "path"])
def test_multimodal_data_is_refused_with_the_reason(data_dir, by):
    name = "mllm_demo" if by == "name" else str(data_dir / "mllm_demo.json")
    with pytest.raises(LoraforgeError, match=r"image data.* is not supported yet: it is multimodal — loraforge trains text-only .* "
                                             r"<image>.* literal text"):
        resolve_datasets(data_dir if by == "name" else None, [name])


def test_ranking_data_for_kto_is_unpaired(data_dir):
    records = load(data_dir, "dpo_zh_demo", stage="kto").records
    assert [(r.conversation.turns[-1].text, r.desirable) for r in records[:2]] == [
        (ZH_PAIRS[0][1], True), (ZH_PAIRS[0][2], False)]


def test_scored_answers_pair_the_best_with_each_lower_one(data_dir):
    report = load(data_dir, "scored")
    # 您好！(9) is the first of the two best; 您好啊！(9) ties it and makes no pair; 说再见 has one answer
    assert [(r.prompt.turns[-1].text, r.chosen, r.rejected) for r in report.records] == [
        ("写一句问候", "您好！", "嗯。"), ("写一句问候", "您好！", "你好。")]
    assert "1 prompts have no lower-scored answer" in report.notes[0]


def test_scored_answers_for_kto_split_at_the_threshold(data_dir):
    median = load(data_dir, "scored", stage="kto")
    assert [r.desirable for r in median.records] == [True, False, False, True, True]  # median 7
    fixed = load(data_dir, "scored", stage="kto", score_threshold=6)
    assert [r.desirable for r in fixed.records] == [True, False, True, True, True]


def test_scored_file_by_path_is_detected(data_dir):
    assert load(None, str(data_dir / "scored.jsonl")).records == load(data_dir, "scored").records


def test_bad_kto_label_points_at_the_record(data_dir):
    rows = json.loads((data_dir / "kto_en_demo.json").read_text())
    rows[1]["label"] = "maybe"
    write(data_dir / "kto_en_demo.json", rows)
    with pytest.raises(LoraforgeError, match=r"kto_en_demo\.json:\d+: field 'label' must be true or false"):
        load(data_dir, "kto_en_demo", stage="kto")


def test_num_samples_split_and_subset_are_honoured(data_dir):
    sampled = load(data_dir, "dpo_sampled", seed=1).records
    assert len(sampled) == 5 and {r.chosen for r in sampled} == {c for _, c, _ in ZH_PAIRS}  # all, then repeats
    assert load(data_dir, "dpo_sampled", seed=1).records == sampled  # seeded
    assert [r.chosen for r in load(data_dir, "dpo_sliced").records] == [ZH_PAIRS[1][1], ZH_PAIRS[2][1]]
    assert [r.chosen for r in load(data_dir, "dpo_parts_zh").records] == [ZH_PAIRS[0][1]]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("split", "validation", r"split 'validation' — a local file has one split, 'train'"),
    ("num_samples", 0, r"num_samples must be a whole number ≥ 1"),
    ("subset", "en", r"subset 'en' names a part of a dataset, but file_name is the single file"),
])
def test_sampling_keys_that_cannot_apply_are_errors(data_dir, key, value, message):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["dpo_zh_demo"][key] = value
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(LoraforgeError, match=message):
        load(data_dir, "dpo_zh_demo")


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize("template", ["chinese-alpaca", "llama2-zh", "default", "chatml"])
def test_pair_ids_are_sfts_ids_and_the_inference_prompt(spm_tokenizer, template):
    """The prompt of a pair has the ids SFT gives it and the ids the generation prompt gets at inference;
    the answer is exactly SFT's learned span (answer + end token)."""
    tokenizer = AutoTokenizer.from_pretrained(spm_tokenizer)
    t = get_template(template)
    prompt = Conversation((Turn("user", "在吗"), Turn("assistant", "在的。"), Turn("user", " 推荐一本书 ")),
                          system="你是一个有礼貌的助手。")
    for answer in ("您好，推荐您读《红楼梦》。", "不知道。"):
        prompt_ids, answer_ids = prompt_and_answer(tokenizer, t, prompt, answer)
        sft = encode_conversation(tokenizer, t, Conversation((*prompt.turns, Turn("assistant", answer)),
                                                             system=prompt.system),
                                  cutoff_len=4096)
        assert prompt_ids + answer_ids == sft.input_ids
        assert sft.labels[len(prompt_ids):] == answer_ids  # all learned
        assert sft.labels[len(prompt_ids) - 1] == IGNORE
        assert prompt_ids == encode_prompt_turns(tokenizer, t, prompt.system, list(prompt.turns))
        # LLaMA-Factory's templates also learn what follows the end token (its "\n" after </s>)
        assert tokenizer.decode(answer_ids).startswith(answer + (t.end_token or tokenizer.eos_token))


# ---------------------------------------------------------------- data check


def check_config(model, data_dir, *overrides):
    return load_config(None, [f"model.path={model}", f"data.dir={data_dir}", "data.template=chinese-alpaca",
                              "train.output_dir=/tmp/pt-pref-unused", *overrides])


def test_data_check_reports_pairs_ties_lengths_and_cuts(tiny_llama, data_dir):
    rows = json.loads((data_dir / "dpo_zh_demo.json").read_text())
    rows.append(sharegpt_pair("重复", "一样的回答。", "一样的回答。"))
    rows.append(sharegpt_pair("长", "好" * 300, "短。"))
    write(data_dir / "dpo_zh_demo.json", rows)
    report = check_data(check_config(tiny_llama, data_dir, "stage=dpo", "data.datasets=dpo_zh_demo",
                                     "data.cutoff_len=256"))
    assert (report.examples, report.ties, report.truncated) == (5, 1, 1)
    assert set(report.pref_percentiles) == {"prompt", "chosen", "rejected"}
    assert report.pref_percentiles["chosen"]["max"] > 256 - report.pref_percentiles["prompt"]["max"]
    text = format_report(report)
    assert "5 pairs; 1 ties" in text and "1 cut by cutoff_len=256" in text
    assert "  rejected: ⟦短。</s>⟧" in text  # the longest pair is shown, its cut answer without the end token


def test_data_check_kto_counts_desirable(tiny_llama, data_dir):
    report = check_data(check_config(tiny_llama, data_dir, "stage=kto", "data.datasets=kto_en_demo"))
    assert (report.examples, report.desirable) == (2, 1)
    assert "2 KTO examples: 1 desirable, 1 undesirable" in format_report(report)


def test_data_check_warns_about_identity_placeholders(tiny_llama, data_dir):
    # LLaMA-Factory's identity.json ships with {{name}} and {{author}} for the user to fill in
    write(data_dir / "identity.json", [
        {"instruction": "你是谁？", "output": "我是 {{name}}，由 {{author}} 开发的助手。"},
        {"instruction": "hi", "output": "Hello! I am {{name}}."},
        {"instruction": "1+1", "output": "2"}])
    report = check_data(check_config(tiny_llama, data_dir, "stage=sft", f"data.datasets={data_dir / 'identity.json'}"))
    assert report.placeholder_warning.startswith("warning: 2 records hold {{…}} placeholders "
                                                 "({{name}} ×2, {{author}} ×1)")
    assert report.placeholder_warning in format_report(report)
