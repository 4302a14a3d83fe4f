"""Shared fixtures for the inference tests (and the server's): the learned run as a GGUF,
and both engines opened on it once per session.

tests/infer is a package so this conftest does not take the module name `conftest` from
the root one (test modules elsewhere do `from conftest import …`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def learned_run_dir(learned_run) -> Path:
    """The trained SFT adapter dir (its adapter_config.json names the pre-trained base)."""
    return Path(learned_run[1].output_dir)


@pytest.fixture(scope="session")
def learned_questions(learned_run) -> list[tuple[str, str]]:
    """(question, trained answer) for the instructions learned_run learned by heart."""
    config = learned_run[0]
    records = json.loads(Path(config.data.datasets[0]).read_text(encoding="utf-8"))
    return [(r["instruction"] + (("\n" + r["input"]) if r.get("input") else ""), r["output"]) for r in records]


@pytest.fixture(scope="session")
def learned_gguf_f16(learned_run, tmp_path_factory) -> Path:
    """base + the learned adapter exported to one F16 GGUF (chat template 'chinese-alpaca' inside)."""
    from loraforge.export.gguf_writer import export_gguf

    config, result = learned_run
    return export_gguf(config.model.path, [result.output_dir], tmp_path_factory.mktemp("gguf") / "learned-f16.gguf",
                       "f16")


@pytest.fixture(scope="session")
def hf_engine(learned_run_dir):
    from loraforge.infer.engine import open_engine

    engine = open_engine(str(learned_run_dir), engine="hf")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gguf_engine(learned_gguf_f16):
    from loraforge.infer.engine import open_engine

    engine = open_engine(str(learned_gguf_f16), n_ctx=512)
    yield engine
    engine.close()
