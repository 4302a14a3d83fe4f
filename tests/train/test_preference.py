"""Preference stages on a tiny pre-trained model learn a preference they were not shown verbatim.

The pairs are ours: a question answered politely (chosen) or rudely (rejected), in Chinese
and English, the same fact in both. Held-out questions never appear in training. Log-probs
and rewards are computed with plain transformers/peft on the saved run — not through TRL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from loraforge.config import load_config
from loraforge.data.preference import prompt_and_answer
from loraforge.data.records import Conversation, Turn
from loraforge.data.templates import get_template
from loraforge.errors import LoraforgeError
from loraforge.tokenizer import load_tokenizer
from loraforge.train.callbacks import read_log
from loraforge.train.run import train

ZH_TRAIN = [("中国的首都是哪里？", "北京"), ("一年有几个月？", "十二个月"), ("水的化学式是什么？", "H2O"),
            ("太阳从哪边升起？", "东边"), ("一周有几天？", "七天"), ("熊猫吃什么？", "竹子"), ("长城在哪个国家？", "中国"),
            ("冰是什么做的？", "水"), ("天空是什么颜色？", "蓝色"), ("一天有多少小时？", "二十四小时"),
            ("地球绕着什么转？", "太阳"), ("春节在几月？", "一月或二月"), ("鱼用什么呼吸？", "鳃"),
            ("猫会怎么叫？", "喵喵叫"), ("秋天树叶是什么颜色？", "黄色"), ("月亮在什么时候出现？", "晚上"),
            ("苹果长在哪里？", "树上"), ("中文有多少声调？", "四个"), ("雪是什么颜色？", "白色"), ("人有几只眼睛？", "两只")]
ZH_HELD = [("海水是什么味道？", "咸的"), ("夏天天气怎么样？", "炎热"), ("鸟用什么飞？", "翅膀"),
           ("上海在哪个国家？", "中国"), ("一小时有多少分钟？", "六十分钟"), ("牛奶是什么颜色？", "白色")]
EN_TRAIN = [("What is the capital of France?", "Paris"), ("How many legs does a dog have?", "four"),
            ("What color is grass?", "green"), ("What do bees make?", "honey")]
EN_HELD = [("What color is the sun?", "yellow"), ("How many days are in a week?", "seven")]


def pair(question: str, fact: str, english: bool) -> tuple[str, str, str]:
    if english:
        return question, f"Sure, happy to help: {fact}.", f"Ugh, look it up: {fact}."
    return question, f"您好，很高兴为您解答：{fact}。", f"烦死了，自己查去：{fact}。"


TRAIN = [pair(q, f, False) for q, f in ZH_TRAIN] + [pair(q, f, True) for q, f in EN_TRAIN]
HELD = [pair(q, f, False) for q, f in ZH_HELD] + [pair(q, f, True) for q, f in EN_HELD]
TEMPLATE = "chinese-alpaca"


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    """The training pairs in LLaMA-Factory's dpo_zh_demo layout, and as KTO feedback (kto_en_demo layout)."""
    root = tmp_path_factory.mktemp("pref_data")
    pairs = [{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": c},
              "rejected": {"from": "gpt", "value": r}} for q, c, r in TRAIN]
    feedback = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": good}
                for q, c, r in TRAIN for a, good in ((c, True), (r, False))]
    paths = {"pairs": root / "dpo_pairs.json", "kto": root / "kto_feedback.json"}
    paths["pairs"].write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    paths["kto"].write_text(json.dumps(feedback, ensure_ascii=False), encoding="utf-8")
    return paths


def pref_config(model: Path, out: Path, data: Path, *overrides: str):
    return load_config(None, [
        f"model.path={model}", f"train.output_dir={out}", f"data.datasets={data}", f"data.template={TEMPLATE}",
        "train.batch_size=8", "train.epochs=4", "train.lr=5e-3", "train.logging_steps=1", "train.save_steps=100000",
        "train.seed=0", *overrides])


def answer_logps(model, tokenizer) -> list[tuple[float, float]]:
    """Per held-out pair: log p(chosen | prompt) and log p(rejected | prompt), summed over the answer's tokens."""
    template = get_template(TEMPLATE)
    out = []
    for question, chosen, rejected in HELD:
        values = []
        for answer in (chosen, rejected):
            prompt, ids = prompt_and_answer(tokenizer, template, Conversation((Turn("user", question),)), answer)
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
            values.append(logp[len(prompt) - 1:].gather(1, full[0, len(prompt):, None]).sum().item())
        out.append(tuple(values))
    return out


def margins(logps: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean chosen − rejected log-prob margin, and the share of pairs where chosen is more likely."""
    diffs = [c - r for c, r in logps]
    return sum(diffs) / len(diffs), sum(d > 0 for d in diffs) / len(diffs)


@pytest.fixture(scope="module")
def base_logps(pretrained_llama):
    model = AutoModelForCausalLM.from_pretrained(pretrained_llama, dtype=torch.float32)
    return answer_logps(model, load_tokenizer(pretrained_llama))


def run_logps(base: Path, run: Path):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if (run / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, run)
    else:
        model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    return answer_logps(model.eval(), load_tokenizer(run))


@pytest.fixture(scope="module")
def dpo_run(pretrained_llama, pref_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dpo"
    return train(pref_config(pretrained_llama, out, pref_data["pairs"], "stage=dpo", "pref_beta=0.1")), out


@pytest.mark.slow
def test_dpo_raises_the_heldout_margin_and_accuracy(pretrained_llama, dpo_run, base_logps):
    _, out = dpo_run
    before, after = margins(base_logps), margins(run_logps(pretrained_llama, out))
    # the base prefers the short rude answers; DPO turns that around on questions it never saw
    assert after[0] > before[0] + 20, (before, after)
    assert after[1] >= before[1] + 0.5, (before, after)


@pytest.mark.slow
def test_dpo_run_directory_is_like_sfts(pretrained_llama, dpo_run):
    result, out = dpo_run
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and Path(adapter["base_model_name_or_path"]) == pretrained_llama
    assert "stage: dpo" in (out / "loraforge.yaml").read_text()
    tokenizer_cfg = json.loads((out / "tokenizer_config.json").read_text())
    chat_template = tokenizer_cfg.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert "### Response: " in chat_template
    assert (out / "tokenizer.model").read_bytes() == (pretrained_llama / "tokenizer.model").read_bytes()
    assert json.loads((out / "trained_on.json").read_text())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [r for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    assert len(rows) == result.steps == 12
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["rewards/accuracies"] == 1.0
    assert result.last_loss < result.first_loss


@pytest.mark.slow
def test_dpo_lora_run_merges_like_an_sft_run(pretrained_llama, dpo_run, tmp_path):
    from loraforge.cli import main

    _, out = dpo_run
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(pretrained_llama), "--adapter", str(out), "-o", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    flat = lambda logps: [value for pair_ in logps for value in pair_]  # noqa: E731
    assert flat(answer_logps(plain, load_tokenizer(merged))) == pytest.approx(
        flat(run_logps(pretrained_llama, out)), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "orpo", "simpo"])
def test_other_dpo_losses_train_and_move_the_margin(pretrained_llama, pref_data, base_logps, tmp_path, loss):
    result = train(pref_config(pretrained_llama, tmp_path / loss, pref_data["pairs"], "stage=dpo",
                               f"pref_loss={loss}"))
    assert result.steps == 12 and result.last_loss < result.first_loss
    before, after = margins(base_logps), margins(run_logps(pretrained_llama, tmp_path / loss))
    assert after[0] > before[0] + 5, (loss, before, after)


@pytest.mark.slow
def test_dpo_full_fine_tuning(pretrained_llama, pref_data, base_logps, tmp_path):
    out = tmp_path / "full"
    train(pref_config(pretrained_llama, out, pref_data["pairs"], "stage=dpo", "method=full", "train.lr=5e-4",
                      "train.epochs=2"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    before, after = margins(base_logps), margins(run_logps(pretrained_llama, out))
    assert after[0] > before[0] + 20, (before, after)


@pytest.mark.slow
def test_kto_moves_desirable_up_and_undesirable_down(pretrained_llama, pref_data, base_logps, tmp_path):
    out = tmp_path / "kto"
    train(pref_config(pretrained_llama, out, pref_data["kto"], "stage=kto", "train.epochs=2"))
    after = run_logps(pretrained_llama, out)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean([c for c, _ in after]) > mean([c for c, _ in base_logps]) + 5
    assert mean([r for _, r in after]) < mean([r for _, r in base_logps]) - 5


@pytest.mark.slow
def test_reward_model_ranks_heldout_chosen_first_and_scores_text(pretrained_llama, pref_data, tmp_path, capsys):
    from loraforge.train.preference import score

    out = tmp_path / "rm"
    train(pref_config(pretrained_llama, out, pref_data["pairs"], "stage=rm", "train.epochs=6"))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    # ground truth: plain transformers + peft on the saved run
    tokenizer = load_tokenizer(out)
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(pretrained_llama, num_labels=1), out).eval()
    template = get_template(TEMPLATE)
    rewards = []
    for question, chosen, rejected in HELD:
        pair_rewards = []
        for answer in (chosen, rejected):
            prompt, ids = prompt_and_answer(tokenizer, template, Conversation((Turn("user", question),)), answer)
            with torch.no_grad():
                pair_rewards.append(model(input_ids=torch.tensor([prompt + ids])).logits[0, 0].item())
        rewards.append(pair_rewards)
    ranked = sum(c > r for c, r in rewards) / len(rewards)
    assert ranked >= 0.875, rewards  # chance is 0.5
    conversations = [Conversation((Turn("user", q), Turn("assistant", a))) for q, c, r in HELD for a in (c, r)]
    assert score(out, conversations) == pytest.approx([x for pair_ in rewards for x in pair_], abs=1e-4)

    # the command: held-out pairs in dpo_zh_demo's layout, and alpaca answers, scored into jsonl
    from loraforge.cli import main

    held = tmp_path / "held_pairs.json"
    held.write_text(json.dumps([{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": c},
                                 "rejected": {"from": "gpt", "value": r}} for q, c, r in HELD], ensure_ascii=False),
                    encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"instruction": q, "output": c}, ensure_ascii=False) + "\n"
                               for q, c, _ in HELD[:2]), encoding="utf-8")
    assert main(["score", str(out), "--data", f"{held},{answers}", "-o", str(tmp_path / "scores.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x for line in lines[:len(HELD)] for x in (line["chosen"], line["rejected"])] == pytest.approx(
        [x for pair_ in rewards for x in pair_], abs=1e-4)
    assert [line["reward"] for line in lines[len(HELD):]] == pytest.approx([c for c, _ in rewards[:2]], abs=1e-4)
    assert lines[0]["source"] == f"{held}:1"
    right = sum(c > r for c, r in rewards)
    assert f"chosen above rejected in {right} of {len(HELD)} pairs" in capsys.readouterr().out

    # a reward model does not generate: every command that expects a generating model says so, writing nothing
    for command in (["export", "gguf", "--base", str(pretrained_llama), "--adapter", str(out), "-o",
                     str(tmp_path / "rm.gguf")], ["merge", "--base", str(pretrained_llama), "--adapter", str(out),
                                                  "-o", str(tmp_path / "merged")],
                    ["export", "lora-gguf", "--adapter", str(out), "-o", str(tmp_path / "rm-lora.gguf")],
                    ["generate", str(out), "--input", str(answers), "-o", str(tmp_path / "g.jsonl")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{out} is a reward model (stage rm" in err and "loraforge score" in err, (command, err)
    assert not any((tmp_path / name).exists() for name in ("rm.gguf", "merged", "rm-lora.gguf", "g.jsonl"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["stage=kto", "pref_loss=orpo"], r"pref.loss=orpo is a dpo loss; stage kto has its own"),
    (["stage=dpo", "method=prompt_tuning"], r"stage dpo trains with method lora, qlora or full"),
])
def test_preference_configs_that_cannot_train_are_refused(tiny_llama, pref_data, tmp_path, overrides, message):
    with pytest.raises(LoraforgeError, match=message):
        train(pref_config(tiny_llama, tmp_path / "x", pref_data["pairs"], *overrides))


def test_score_refuses_what_is_not_a_reward_model(tiny_llama, tmp_path, capsys):
    from loraforge.cli import main

    assert main(["score", str(tiny_llama), "--data", "x.json", "-o", str(tmp_path / "s.jsonl")]) == 2
    assert f"{tiny_llama} is not a reward model run" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "nope"), "--data", "x.json", "-o", str(tmp_path / "s.jsonl")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_sft_data_for_dpo_names_the_stage(tiny_llama, tmp_path):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "你好", "output": "您好"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(LoraforgeError, match=r"instruction/chat data .* which stage dpo does not train: use "
                                             r"stage: sft"):
        train(pref_config(tiny_llama, tmp_path / "x", data, "stage=dpo"))


# The keys and values of LLaMA-Factory's examples/train_lora/qwen3_lora_{dpo,kto,reward}.yaml
# (hiyouga/LLaMA-Factory at ff6d4d1), as they are, but for the learning rate and epochs: theirs are
# for a 4B model and would not move a tiny one in a test's time.
LF_PREFERENCE_YAMLS = {
    "dpo": ("dpo_zh_demo", "lora/dpo", ["pref_beta: 0.1", "pref_loss: sigmoid"],
            ["per_device_train_batch_size: 1", "gradient_accumulation_steps: 8", "learning_rate: 5.0e-3"]),
    "kto": ("kto_en_demo", "lora/kto", ["pref_beta: 0.1"],
            ["per_device_train_batch_size: 1", "gradient_accumulation_steps: 8", "learning_rate: 5.0e-3"]),
    "rm": ("dpo_en_demo", "lora/reward", [],
           ["per_device_train_batch_size: 1", "gradient_accumulation_steps: 8", "learning_rate: 5.0e-3"]),
}


def lf_data_dir(root: Path, pref_data) -> Path:
    """A data folder laid out as LLaMA-Factory's data/: our pairs and feedback under its demo names,
    described by dataset_info.json entries written as its own are."""
    data_dir = root / "data"
    data_dir.mkdir()
    for name in ("dpo_zh_demo", "dpo_en_demo"):
        (data_dir / f"{name}.json").write_bytes(pref_data["pairs"].read_bytes())
    (data_dir / "kto_en_demo.json").write_bytes(pref_data["kto"].read_bytes())
    pairs = {"ranking": True, "formatting": "sharegpt",
             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
    (data_dir / "dataset_info.json").write_text(json.dumps({
        "dpo_zh_demo": {"file_name": "dpo_zh_demo.json", **pairs},
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", **pairs},
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}}}))
    return data_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(LF_PREFERENCE_YAMLS))
def test_a_llama_factory_preference_yaml_trains_unedited(pretrained_llama, pref_data, tmp_path, capsys, stage):
    """Only the model, the data folder and the output are pointed at local things on the command line."""
    from loraforge.cli import main

    dataset, output, method_keys, train_keys = LF_PREFERENCE_YAMLS[stage]
    yaml = tmp_path / f"qwen3_lora_{stage}.yaml"
    yaml.write_text("\n".join([
        "### model", "model_name_or_path: Qwen/Qwen3-4B-Instruct-2507", "trust_remote_code: true", "",
        "### method", f"stage: {stage}", "do_train: true", "finetuning_type: lora", "lora_rank: 8",
        "lora_target: all", *method_keys, "",
        "### dataset", f"dataset: {dataset}", "template: qwen3_nothink", "cutoff_len: 2048", "max_samples: 1000",
        "preprocessing_num_workers: 16", "dataloader_num_workers: 4", "",
        "### output", f"output_dir: saves/qwen3-4b/{output}", "logging_steps: 10", "save_steps: 500",
        "plot_loss: true", "overwrite_output_dir: true", "save_only_model: false",
        "report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]", "",
        "### train", *train_keys, "num_train_epochs: 3.0", "lr_scheduler_type: cosine", "warmup_ratio: 0.1",
        "bf16: true", "ddp_timeout: 180000000", "resume_from_checkpoint: null", "",
        "### eval", "# val_size: 0.1", "# per_device_eval_batch_size: 1", "# eval_strategy: steps",
        "# eval_steps: 500", ""]), encoding="utf-8")
    out = tmp_path / "out"
    # (logging_steps=1 too: the test reads every step's loss)
    assert main(["train", str(yaml), "model_name_or_path=" + str(pretrained_llama),
                 f"dataset_dir={lf_data_dir(tmp_path, pref_data)}", f"output_dir={out}", "logging_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" not in err, err
    saved = (out / "loraforge.yaml").read_text()
    assert f"stage: {stage}" in saved and "template: qwen3_nothink" in saved
    rows = [r for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    # 8 examples per optimizer step, 3 epochs: 24 pairs → 9 steps, 48 feedback answers → 18
    assert len(rows) == (18 if stage == "kto" else 9), rows
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean([r["loss"] for r in rows[-3:]]) < mean([r["loss"] for r in rows[:3]]), rows
    if stage == "kto":  # 1 × 8 in the YAML: 2 × 4 here, the same 8 examples per step, said in a note
        assert "note: stage kto: train.batch_size 1 → 2 and gradient accumulation 8 → 4 (the same examples" in err
        assert "batch_size: 2" in saved
    if stage == "dpo":
        assert rows[-1]["rewards/margins"] > 0
    if stage == "rm":
        assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize("batch, accum, expected, note", [
    (1, 8, (2, 4), "gradient accumulation 8 → 4 (the same examples per optimizer step)"),
    (1, 1, (2, 1), "gradient accumulation 1 → 1 (2 instead of 1 examples per optimizer step)"),
    (1, 3, (2, 1), "(2 instead of 3 examples per optimizer step)"),
    (4, 2, (4, 2), None),
])
def test_kto_with_one_example_per_micro_batch_gets_two(tiny_llama, pref_data, tmp_path, batch, accum, expected,
                                                       note):
    from loraforge.train.preference import kto_micro_batch

    config = pref_config(tiny_llama, tmp_path / "x", pref_data["kto"], "stage=kto", f"train.batch_size={batch}",
                         f"train.grad_accum={accum}")
    new, said = kto_micro_batch(config)
    assert (new.train.batch_size, new.train.grad_accum) == expected
    assert (said is None) if note is None else (note in said), said
    assert (config.train.batch_size, config.train.grad_accum) == (batch, accum)  # the given config is left alone
