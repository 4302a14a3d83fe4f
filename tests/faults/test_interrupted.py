"""Commands killed outright, disks that fill, models that are not there — in real processes.

kill -9 leaves no file at the target name (only a hidden `.NAME.partial-PID`), and the next
run that writes the same output removes it and says so. A write that hits a file-size limit
(RLIMIT_FSIZE, how a full disk looks to a process without mounting a tmpfs) ends in one
`error:` naming the output, exit 2, nothing written. A missing model directory is named as
one, by every command that takes one.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraforge.cli import main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "tokenizers"


def loraforge(*args: str, limit_bytes: int | None = None, **kwargs) -> subprocess.Popen:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "loraforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if limit_bytes else None, **kwargs)


def kill_when(process: subprocess.Popen, appeared, timeout: float = 240) -> Path:
    """SIGKILL the process the moment `appeared()` returns a path (its unfinished output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = appeared()
        if found is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return found
        if process.poll() is not None:
            pytest.fail(f"finished before it could be killed (rc {process.returncode}): {process.stderr.read()}")
        time.sleep(0.002)
    process.kill()
    pytest.fail("the output never started")


def partials(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.partial-*"))


@pytest.fixture(scope="module")
def big_model(spm_tokenizer, tmp_path_factory) -> Path:
    """Wide enough (≈60 MB of f32 weights) that writing it takes long enough to be interrupted."""
    from loraforge.tiny import TinyShape, build_tiny_model

    shape = TinyShape(hidden=512, layers=4, heads=8, kv_heads=4, ffn=1536)
    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("big"), shape)


# (command, the output it writes, how it is named on the command line)
KILLED = [
    ("export gguf", lambda m, out: ["export", "gguf", "--base", str(m), "--quant", "q8_0", "-o", str(out / "m.gguf")],
     "m.gguf"),
    ("merge", lambda m, out: ["merge", "--base", str(m), "-o", str(out / "merged")], "merged"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, argv, name", KILLED, ids=[k[0] for k in KILLED])
def test_kill_9_leaves_no_output_and_the_next_run_cleans_up(big_model, tmp_path, command, argv, name):
    out = tmp_path / "out"
    out.mkdir()
    process = loraforge(*argv(big_model, out))
    partial = kill_when(process, lambda: next(iter(partials(out, name)), None))
    assert not (out / name).exists(), f"{command} left {name} after kill -9"
    assert partial.exists() and str(process.pid) in partial.name

    again = subprocess.run([sys.executable, "-m", "loraforge", *argv(big_model, out)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"removed {partial}" in again.stderr and "interrupted run" in again.stderr
    assert (out / name).exists() and partials(out, name) == []


@pytest.mark.slow
def test_kill_9_during_vocab_merge(tmp_path):
    from loraforge.vocab.spm import save_hf_tokenizer

    base = save_hf_tokenizer(REAL / "llama2.model", tmp_path / "llama2") or tmp_path / "llama2"
    argv = ["vocab", "merge", "--base", str(base), "--add", str(REAL / "chinese_sp.model"), "-o", str(tmp_path / "zh")]
    process = loraforge(*argv)
    partial = kill_when(process, lambda: next(iter(partials(tmp_path, "zh")), None))
    assert not (tmp_path / "zh").exists() and partial.is_dir()
    again = subprocess.run([sys.executable, "-m", "loraforge", *argv], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"removed {partial}" in again.stderr
    assert (tmp_path / "zh" / "tokenizer.model").exists() and partials(tmp_path, "zh") == []


def test_a_running_writers_partial_is_left_alone(tmp_path):
    """Two runs writing the same name at once: the other one's temporary is not ours to delete."""
    from loraforge.outputs import new_file

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = tmp_path / f".x.gguf.partial-{other.pid}"
        theirs.write_bytes(b"GGUF")
        with new_file(tmp_path / "x.gguf") as tmp:
            tmp.write_bytes(b"ours")
        assert theirs.exists() and (tmp_path / "x.gguf").read_bytes() == b"ours"
    finally:
        other.kill()


# (command, argv, the output that must not appear)
FILE_LIMITED = [
    ("export gguf", lambda m, out: ["export", "gguf", "--base", str(m), "--quant", "f32", "-o", str(out / "m.gguf")]),
    ("merge", lambda m, out: ["merge", "--base", str(m), "-o", str(out / "merged")]),
]


@pytest.mark.parametrize("command, argv", FILE_LIMITED, ids=[f[0] for f in FILE_LIMITED])
def test_a_full_disk_is_an_error_with_nothing_written(tiny_llama, tmp_path, command, argv):
    out = tmp_path / "out"
    out.mkdir()
    process = loraforge(*argv(tiny_llama, out), limit_bytes=200_000)  # the tiny model is ≈1.5 MB
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: writing ") and "file-size limit" in message and "nothing was written" in message
    assert "Traceback" not in err
    assert list(out.iterdir()) == [], f"{command} left {list(out.iterdir())}"


def _config(tmp_path: Path, model: str) -> Path:
    from conftest import DATA_DIR

    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  path: {model}\ndata:\n  dir: {DATA_DIR}\n  datasets: alpaca_zh_demo\n"
                    f"train:\n  output_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    return path


# every command that takes a model directory, pointed at one that does not exist
MISSING = [
    ("train", lambda t, m: ["train", str(_config(t, m))]),
    ("data check", lambda t, m: ["data", "check", str(_config(t, m))]),
    ("chat", lambda t, m: ["chat", m]),
    ("generate", lambda t, m: ["generate", m, "--input", str(t / "p.jsonl"), "-o", str(t / "o.jsonl")]),
    ("serve", lambda t, m: ["serve", m]),
    ("export gguf", lambda t, m: ["export", "gguf", "--base", m, "-o", str(t / "x.gguf")]),
    ("export gguf --adapter", lambda t, m: ["export", "gguf", "--base", str(t), "--adapter", m, "-o", str(t / "x.gguf")]),
    ("merge", lambda t, m: ["merge", "--base", m, "-o", str(t / "merged")]),
    ("vocab resize", lambda t, m: ["vocab", "resize", "--model", m, "--tokenizer", m, "-o", str(t / "r")]),
    ("vocab report", lambda t, m: ["vocab", "report", "--base", m, "--new", m, "--text", str(t / "t.txt")]),
    ("eval ppl", lambda t, m: ["eval", "ppl", m, "--text", str(t / "t.txt")]),
    ("eval quant", lambda t, m: ["eval", "quant", m, "--text", str(t / "t.txt")]),
    ("export imatrix", lambda t, m: ["export", "imatrix", m, "--text", str(t / "t.txt"), "-o", str(t / "i.dat")]),
    ("export lora-gguf --adapter", lambda t, m: ["export", "lora-gguf", "--adapter", m, "-o", str(t / "a.gguf")]),
    ("vocab merge", lambda t, m: ["vocab", "merge", "--base", m, "--add", str(REAL / "chinese_sp.model"),
                                  "-o", str(t / "tok")]),
    ("eval generate", lambda t, m: ["eval", "generate", m, "--data", str(t / "d.json"), "-o", str(t / "ev")]),
    ("eval choice", lambda t, m: ["eval", "choice", m, "--data", str(t / "ceval")]),
    ("score", lambda t, m: ["score", m, "--data", str(t / "d.json"), "-o", str(t / "s.jsonl")]),
]


@pytest.mark.parametrize("command, argv", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_model_directory_is_named(tmp_path, capsys, command, argv):
    (tmp_path / "p.jsonl").write_text('{"prompt": "你好"}\n', encoding="utf-8")
    (tmp_path / "t.txt").write_text("一段文字\n", encoding="utf-8")
    (tmp_path / "d.json").write_text('[{"instruction": "你好", "output": "您好"}]', encoding="utf-8")
    (tmp_path / "ceval" / "val").mkdir(parents=True)
    (tmp_path / "ceval" / "val" / "art_val.csv").write_text("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,A\n",
                                                              encoding="utf-8")
    missing = str(tmp_path / "no-such-model")
    code = main(argv(tmp_path, missing))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: no such {'adapter' if '--adapter' in command else 'model'} directory: {missing}" in err, err
    assert "Traceback" not in err and "Repo id" not in err and not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_kill_9_during_train_resumes_from_the_last_checkpoint_with_the_same_curve(pretrained_llama, tmp_path):
    """Killed between saves: the checkpoint survives, the resumed run retrains the lost steps and its
    logged losses equal an uninterrupted run's, each step once."""
    from loraforge.train.callbacks import read_log

    from conftest import DATA_DIR

    config = tmp_path / "sft.yaml"
    config.write_text("stage: sft\nmethod: lora\n", encoding="utf-8")

    def argv(out: Path, *more: str) -> list[str]:
        return ["train", str(config), f"model.path={pretrained_llama}", f"train.output_dir={out}", f"data.dir={DATA_DIR}",
                "data.datasets=alpaca_zh_demo", "data.template=chinese-alpaca", "data.cutoff_len=256",
                "data.max_samples=48", "train.max_steps=40", "train.batch_size=4", "train.lr=5e-3",
                "train.logging_steps=1", "train.save_steps=5", "train.group_by_length=false", "train.seed=0",
                *more]

    whole_run = subprocess.run([sys.executable, "-m", "loraforge", *argv(tmp_path / "whole")],
                               capture_output=True, text=True, timeout=600)
    assert whole_run.returncode == 0, whole_run.stderr
    whole = {r["step"]: r["loss"] for r in read_log(tmp_path / "whole" / "trainer_log.jsonl") if "loss" in r}

    cut = tmp_path / "cut"

    def past_a_checkpoint() -> Path | None:
        # a checkpoint is complete once the Trainer wrote its state; kill a few steps after it
        done = sorted(cut.glob("checkpoint-*/trainer_state.json"))
        rows = read_log(cut / "trainer_log.jsonl") if done else []
        return done[0].parent if rows and rows[-1]["step"] >= 7 else None

    process = loraforge(*argv(cut))
    kill_when(process, past_a_checkpoint)
    before = {r["step"] for r in read_log(cut / "trainer_log.jsonl") if "loss" in r}
    last = max(int(p.name.split("-")[1]) for p in cut.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert not (cut / "adapter_model.safetensors").exists() and max(before) > last  # steps past the save are lost

    resumed = subprocess.run([sys.executable, "-m", "loraforge", *argv(cut, "train.resume_from_checkpoint=last")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = [r for r in read_log(cut / "trainer_log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == sorted(whole), "each step logged once, in order"
    for row in rows:
        assert row["loss"] == pytest.approx(whole[row["step"]], rel=1e-4), row
    assert (cut / "adapter_model.safetensors").exists()


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path, tiny_llama, capsys):
    """A run stopped while the Trainer wrote checkpoint-10 (no trainer_state.json yet, which it
    writes last) resumes from checkpoint-5, and says so; naming the cut one is a clear error."""
    from loraforge.errors import LoraforgeError
    from loraforge.train.run import resolve_resume

    from conftest import sft_config

    out = tmp_path / "run"
    for step, done in ((5, True), (10, False)):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"")
        if done:
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}", encoding="utf-8")
    last = sft_config(tiny_llama, out, "train.resume_from_checkpoint=last")
    assert resolve_resume(last, out) == str(out / "checkpoint-5")
    assert "checkpoint-10 in" in capsys.readouterr().err
    cut = sft_config(tiny_llama, out, f"train.resume_from_checkpoint={out / 'checkpoint-10'}")
    with pytest.raises(LoraforgeError, match="an incomplete checkpoint"):
        resolve_resume(cut, out)
