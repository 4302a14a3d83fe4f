"""An importance matrix from in-domain text lowers the low-bit types' KL divergence on held-out text.

A 256-wide LLaMA (the K- and i-quant blocks are 256 values) pre-trained for seconds on the bundled corpus,
given a real model's outlier activation channels by an exact reparameterization (`tiny.add_outlier_channels`:
a model this small trained this briefly has none, and they are what an imatrix exploits); the imatrix comes
from zh_corpus.txt, KL is measured by `eval quant` on zh_heldout.txt, which shares no text with it.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CORPUS, DATA_DIR

HELDOUT = DATA_DIR / "zh_heldout.txt"


@pytest.fixture(scope="module")
def wide_pretrained_with_outliers(spm_tokenizer, tmp_path_factory):
    from loraforge.config import load_config
    from loraforge.tiny import TinyShape, add_outlier_channels, build_tiny_model
    from loraforge.train.run import train

    work = tmp_path_factory.mktemp("imatrix-helps")
    base = build_tiny_model(spm_tokenizer, work / "wide", TinyShape(hidden=256, ffn=512))
    train(load_config(None, [
        "stage=pt", "method=full", f"model.path={base}", f"train.output_dir={work / 'pre'}", f"data.dir={DATA_DIR}",
        "data.datasets=zh_corpus", "data.block_size=128", "train.batch_size=16", "train.max_steps=150",
        "train.lr=3e-3", "train.logging_steps=20", "train.save_steps=100000"]))
    return add_outlier_channels(work / "pre", work / "outliers")


@pytest.mark.slow
def test_in_domain_imatrix_lowers_kl_of_low_bit_types(wide_pretrained_with_outliers, tmp_path):
    from loraforge.eval.quant_quality import evaluate_quants
    from loraforge.export.imatrix import load_imatrix
    from loraforge.export.imatrix_compute import compute_imatrix, write_imatrix

    model = wide_pretrained_with_outliers
    imatrix = compute_imatrix(model, CORPUS, tmp_path / "im.gguf", n_ctx=128).path
    # IQ2_XS cannot be written without an imatrix: "without" is one of all ones (no information)
    ones = write_imatrix(tmp_path / "ones.gguf", {k: (np.ones_like(v, dtype=np.float64), 1)
                                                  for k, v in load_imatrix(imatrix).items()}, "ones", 1, 128)

    def kl(types, matrix, label):
        report = evaluate_quants(model, HELDOUT, types, imatrix=matrix, n_ctx=128, out_dir=tmp_path / label).report
        return {row["type"]: row["kl_mean"] for row in report["rows"]}

    with_imatrix = kl(["iq2_xs", "q2_k", "q3_k_s"], imatrix, "with")
    without = {**kl(["q2_k", "q3_k_s"], None, "none"), **kl(["iq2_xs"], ones, "ones")}
    for kind in ("iq2_xs", "q2_k", "q3_k_s"):
        assert with_imatrix[kind] < 0.97 * without[kind], (kind, with_imatrix, without)
