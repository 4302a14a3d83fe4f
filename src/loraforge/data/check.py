"""`loraforge data check`: see the data as the model will, before training on it.

Per dataset: the detected format, record counts and skipped problems. Then one example
decoded back from its token ids with the learned (label) spans marked, token-length
percentiles, and how many examples the cut-off length truncates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loraforge.config import Config
from loraforge.data.dataset import load_reports, resolve_specs, tokenize_reports
from loraforge.data.tokenize import IGNORE

LEARN_OPEN, LEARN_CLOSE = "⟦", "⟧"


@dataclass
class CheckReport:
    stage: str
    template: str
    datasets: list[tuple[str, str, int, int]]  # name, format, kept, problems
    problems_summary: str
    examples: int
    truncated: int
    dropped_empty: int
    percentiles: dict[str, int] = field(default_factory=dict)
    limit_name: str = "cutoff_len"
    limit: int = 0
    rendered: str = ""


def mark_learned(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode an example, wrapping the tokens that carry a label in ⟦ ⟧."""
    out, run, learned = [], [], None
    for token, label in zip(input_ids, labels):
        flag = label != IGNORE
        if flag != learned and run:
            out.append(_span(tokenizer, run, learned))
            run = []
        run.append(token)
        learned = flag
    if run:
        out.append(_span(tokenizer, run, learned))
    return "".join(out)


def _span(tokenizer, ids: list[int], learned: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{LEARN_OPEN}{text}{LEARN_CLOSE}" if learned else text


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    lengths = np.array(lengths)
    return {name: int(np.percentile(lengths, q)) for name, q in
            (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


def check_data(config: Config, tokenizer=None) -> CheckReport:
    from loraforge.train.run import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(config)
    reports = load_reports(config, resolve_specs(config))
    examples, stats = tokenize_reports(config, tokenizer, reports)
    pt = config.stage == "pt"
    # the longest of the first few examples shows the most structure (history, system, input)
    sample = 0 if pt else max(range(min(50, len(examples))), key=lambda i: len(examples.input_ids[i]))
    return CheckReport(
        stage=config.stage,
        template=config.data.template,
        datasets=[(r.name, r.format, len(r.records), len(r.problems)) for r in reports],
        problems_summary=stats.problems,
        examples=len(examples),
        truncated=stats.truncated,
        dropped_empty=stats.dropped_empty,
        percentiles=length_percentiles(stats.full_lengths or [len(ids) for ids in examples.input_ids]),
        limit_name="block_size" if pt else "cutoff_len",
        limit=(config.data.block_size or config.data.cutoff_len) if pt else config.data.cutoff_len,
        rendered=mark_learned(tokenizer, examples.input_ids[sample], examples.labels[sample]),
    )


def format_report(report: CheckReport) -> str:
    lines = [f"stage {report.stage} · template {report.template}", ""]
    lines.append(f"{'dataset':<24} {'format':<10} {'records':>8} {'invalid':>8}")
    for name, fmt, kept, bad in report.datasets:
        lines.append(f"{name:<24} {fmt:<10} {kept:>8} {bad:>8}")
    if report.problems_summary:
        lines += ["", report.problems_summary]
    lines.append("")
    if report.stage == "pt":
        lines.append(f"{report.examples} blocks of {report.limit} tokens")
    else:
        lines.append(f"{report.examples} examples; {report.truncated} truncated by {report.limit_name}={report.limit}"
                     + (f"; {report.dropped_empty} dropped (no answer left after truncation)" if report.dropped_empty else ""))
    lines.append(("token lengths before truncation: " if report.stage == "sft" else "block lengths: ") + "  ".join(f"{k} {v}" for k, v in report.percentiles.items()))
    lines += ["", f"one example as the model sees it (learned tokens between {LEARN_OPEN} {LEARN_CLOSE}):", "",
              report.rendered]
    return "\n".join(lines)
