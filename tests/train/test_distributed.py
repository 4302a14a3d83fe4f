"""`torchrun --nproc_per_node 2 loraforge train` trains data-parallel on CPU (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraforge.train.callbacks import read_log

from conftest import DATA_DIR

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, model: Path, out: Path, batch_size: int) -> Path:
    path.write_text(yaml.safe_dump({
        "stage": "sft", "method": "lora",
        "model": {"path": str(model)},
        "data": {"dir": str(DATA_DIR), "datasets": "alpaca_zh_demo", "template": "chinese-alpaca",
                 "cutoff_len": 384, "max_samples": 64},
        "lora": {"r": 8},
        "train": {"output_dir": str(out), "max_steps": 16, "batch_size": batch_size, "lr": 5e-3,
                  "logging_steps": 1, "save_steps": 1000, "group_by_length": False, "scheduler": "constant"},
    }))
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tail_loss(out: Path) -> float:
    losses = [r["loss"] for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    return sum(losses[-4:]) / 4


def test_two_process_data_parallel_reaches_single_process_loss(pretrained_llama, tmp_path):
    single = write_config(tmp_path / "one.yaml", pretrained_llama, tmp_path / "one", batch_size=8)
    double = write_config(tmp_path / "two.yaml", pretrained_llama, tmp_path / "two", batch_size=4)
    run([sys.executable, "-m", "loraforge", "train", str(single)])
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "loraforge", "train", str(double)])
    # same global batch (2 × 4 = 8): the curves should land in the same place
    one, two = tail_loss(tmp_path / "one"), tail_loss(tmp_path / "two")
    first = read_log(tmp_path / "two" / "trainer_log.jsonl")[0]["loss"]
    print(f"first {first:.3f}  single-process {one:.3f}  two processes {two:.3f}")
    assert two < 0.8 * first
    assert two == pytest.approx(one, rel=0.1), (one, two)
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()
    assert done.stdout.count("run directory:") == 1  # only rank 0 reports
