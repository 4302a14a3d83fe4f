"""`loraforge data check`: see the data as the model will, before training on it.

Per dataset: the detected format, record counts and skipped problems. Then one example
decoded back from its token ids with the learned (label) spans marked, token-length
percentiles, and how many examples the cut-off length truncates. Preference data (dpo,
rm, kto) reports pairs, ties (chosen == rejected), desirable/undesirable counts, prompt /
chosen / rejected token lengths and how many the cut-off length cuts. Every dataset is
scanned for LLaMA-Factory's `{{name}}`-style placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loraforge.config import Config
from loraforge.data.dataset import PREFERENCE_STAGES, load_reports, resolve_specs, tokenize_reports
from loraforge.data.preference import FeedbackExamples
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
    notes: list[str] = field(default_factory=list)  # pairing, sampling
    placeholder_warning: str = ""
    ties: int = 0  # dpo/rm: pairs whose chosen and rejected answers are the same text
    desirable: int | None = None  # kto: desirable examples (the rest undesirable)
    pref_percentiles: dict[str, dict[str, int]] = field(default_factory=dict)  # prompt/chosen/rejected lengths


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
    if config.stage in PREFERENCE_STAGES:
        return _preference_report(config, tokenizer, reports, examples, stats)
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
        notes=stats.notes,
        placeholder_warning=stats.placeholder_warning(),
    )


def _preference_report(config: Config, tokenizer, reports, examples, stats) -> CheckReport:
    kto = isinstance(examples, FeedbackExamples)
    answers = examples.completion_ids if kto else examples.chosen_ids
    sample = max(range(min(50, len(examples))), key=lambda i: len(examples.prompt_ids[i]) + len(answers[i]))
    prompt = _decode(tokenizer, examples.prompt_ids[sample])
    if kto:
        mark = "desirable" if examples.labels[sample] else "undesirable"
        rendered = f"{prompt}{LEARN_OPEN}{_decode(tokenizer, answers[sample])}{LEARN_CLOSE}  ({mark})"
    else:
        rendered = "\n".join([prompt, f"  chosen:   {LEARN_OPEN}{_decode(tokenizer, examples.chosen_ids[sample])}"
                                       f"{LEARN_CLOSE}",
                               f"  rejected: {LEARN_OPEN}{_decode(tokenizer, examples.rejected_ids[sample])}"
                               f"{LEARN_CLOSE}"])
    return CheckReport(
        stage=config.stage,
        template=config.data.template,
        datasets=[(r.name, r.format, len(r.records), len(r.problems)) for r in reports],
        problems_summary=stats.problems,
        examples=len(examples),
        truncated=stats.truncated,
        dropped_empty=stats.dropped_empty,
        limit=config.data.cutoff_len,
        rendered=rendered,
        notes=stats.notes,
        placeholder_warning=stats.placeholder_warning(),
        ties=0 if kto else examples.ties,
        desirable=sum(examples.labels) if kto else None,
        pref_percentiles={key: length_percentiles(values) for key, values in stats.pref.lengths.items() if values},
    )


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def format_report(report: CheckReport) -> str:
    lines = [f"stage {report.stage} · template {report.template}", ""]
    lines.append(f"{'dataset':<24} {'format':<10} {'records':>8} {'invalid':>8}")
    for name, fmt, kept, bad in report.datasets:
        lines.append(f"{name:<24} {fmt:<10} {kept:>8} {bad:>8}")
    lines += report.notes
    if report.problems_summary:
        lines += ["", report.problems_summary]
    if report.placeholder_warning:
        lines += ["", report.placeholder_warning]
    lines.append("")
    if report.pref_percentiles:
        return "\n".join(lines + _preference_lines(report))
    if report.stage == "pt":
        lines.append(f"{report.examples} blocks of {report.limit} tokens")
    else:
        lines.append(f"{report.examples} examples; {report.truncated} truncated by {report.limit_name}={report.limit}"
                     + (f"; {report.dropped_empty} dropped (no answer left after truncation)" if report.dropped_empty else ""))
    lines.append(("token lengths before truncation: " if report.stage == "sft" else "block lengths: ") + "  ".join(f"{k} {v}" for k, v in report.percentiles.items()))
    lines += ["", f"one example as the model sees it (learned tokens between {LEARN_OPEN} {LEARN_CLOSE}):", "",
              report.rendered]
    return "\n".join(lines)


def _preference_lines(report: CheckReport) -> list[str]:
    if report.desirable is not None:
        head = (f"{report.examples} KTO examples: {report.desirable} desirable, "
                f"{report.examples - report.desirable} undesirable")
    else:
        head = f"{report.examples} pairs; {report.ties} ties (chosen == rejected: nothing to learn)"
    lines = [head + f"; {report.truncated} cut by cutoff_len={report.limit}"
             + (f"; {report.dropped_empty} dropped (the prompt alone fills it)" if report.dropped_empty else ""),
             "token lengths before truncation:"]
    names = {"prompt": "prompt", "chosen": "desirable" if report.desirable is not None else "chosen",
             "rejected": "undesirable" if report.desirable is not None else "rejected"}
    for key, values in report.pref_percentiles.items():
        lines.append(f"  {names[key]:<11} " + "  ".join(f"{k} {v}" for k, v in values.items()))
    return lines + ["", f"one example as the model sees it (answers between {LEARN_OPEN} {LEARN_CLOSE}):", "",
                    report.rendered]
