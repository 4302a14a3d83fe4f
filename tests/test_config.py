"""Config: YAML + key=value overrides, LLaMA-Factory aliases, errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from loraforge.config import dump_config, load_config, parse_override
from loraforge.errors import LoraforgeError

MINIMAL = {"model": {"path": "m"}, "data": {"datasets": "a"}, "train": {"output_dir": "o"}}


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["lora.r=16", "train.lr=2e-4", "data.datasets=a,b",
                                                    "data.train_on_prompt=true", "train.epochs=1.5"])
    assert config.lora.r == 16
    assert config.train.lr == pytest.approx(2e-4)
    assert config.data.datasets == ["a", "b"]
    assert config.data.train_on_prompt is True
    assert config.train.epochs == 1.5


def test_llama_factory_flat_names_are_accepted(tmp_path):
    tree = {"model_name_or_path": "base", "dataset": "alpaca_zh_demo,sharegpt_zh_demo", "dataset_dir": "data",
            "template": "chatml", "cutoff_len": 77, "lora_rank": 4, "lora_alpha": 8, "lora_target": "q_proj,v_proj",
            "additional_target": "embed_tokens,lm_head", "output_dir": "out", "learning_rate": 5e-5,
            "num_train_epochs": 2.0, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 5,
            "lr_scheduler_type": "linear", "finetuning_type": "lora", "stage": "sft"}
    config = load_config(write(tmp_path, tree))
    assert (config.model.path, config.data.dir, config.data.template, config.data.cutoff_len) == ("base", "data", "chatml", 77)
    assert config.data.datasets == ["alpaca_zh_demo", "sharegpt_zh_demo"]
    assert (config.lora.r, config.lora.alpha, config.lora.target) == (4, 8, ["q_proj", "v_proj"])
    assert config.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert (config.train.lr, config.train.epochs, config.train.batch_size, config.train.grad_accum) == (5e-5, 2.0, 3, 5)
    assert config.train.scheduler == "linear"


@pytest.mark.parametrize("override, suggestion", [
    ("train.learnig_rate=1", "train.lr"),
    ("lora.rank=3", "lora.r"),
    ("lr=1", "train.lr"),
    ("data.dataset=x", "data.datasets"),
    ("train.epoch=2", "train.epochs"),
    ("lora.modules_to_sav=x", "lora.modules_to_save"),
])
def test_misspelt_key_names_the_closest_valid_one(tmp_path, override, suggestion):
    with pytest.raises(LoraforgeError) as err:
        load_config(write(tmp_path, MINIMAL), [override])
    key = override.split("=")[0]
    assert f"unknown config key '{key}'" in str(err.value)
    assert f"did you mean '{suggestion}'" in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, {**MINIMAL, "lora": {"rank": 4}})
    with pytest.raises(LoraforgeError, match=r"c\.yaml: unknown config key 'lora\.rank' — did you mean 'lora\.r'"):
        load_config(path)


def test_wrong_type_and_missing_keys_are_listed(tmp_path):
    with pytest.raises(LoraforgeError) as err:
        load_config(write(tmp_path, {"data": {"datasets": "a"}}), ["train.lr=abc"])
    message = str(err.value)
    assert "model: required but not set" in message
    assert "train.lr:" in message and "'abc'" in message


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: m\ndata: [unclosed\n")
    with pytest.raises(LoraforgeError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(path)


def test_dump_round_trips(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["lora.r=12", "data.template=llama3"])
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(config)), "again.yaml"))
    assert again == config


@pytest.mark.parametrize("text, expected", [("a=1", ("a", 1)), ("a=2e-4", ("a", 2e-4)), ("a=true", ("a", True)),
                                            ("a=x,y", ("a", "x,y")), ("a=", ("a", ""))])
def test_parse_override(text, expected):
    assert parse_override(text) == expected
