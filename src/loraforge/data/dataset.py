"""Config + tokenizer → tokenized train/eval examples, cached by content.

The cache key covers everything that changes the ids: the tokenizer's files, the stage,
the template, the cut-off/block size, the label options and every data file's bytes.
A changed input never reuses a stale cache; an unchanged one skips tokenization.
Examples are stored as flat int32 arrays in a .npz (no pickle). Preference stages (dpo,
kto, rm) tokenize through data/preference.py each run and are not cached: their data
sets are small, and their examples are triples, not (ids, labels).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraforge.config import Config
from loraforge.data.formats import summarize_problems
from loraforge.data.preference import (
    FeedbackExamples,
    PairExamples,
    PrefStats,
    encode_feedback,
    encode_pairs,
)
from loraforge.data.records import Conversation, Feedback, LoadReport, Preference, Text
from loraforge.data.registry import DatasetSpec, load_datasets, resolve_datasets
from loraforge.data.templates import get_template, jinja_template, template_of  # noqa: F401
from loraforge.data.tokenize import encode_conversation, encode_text_blocks, is_truncated
from loraforge.errors import LoraforgeError
from loraforge.tokenizer import tokenizer_fingerprint

CACHE_FORMAT = 3  # bump when the encoding rules or the stored fields change (3: sentencepiece's own ids)
PREFERENCE_STAGES = ("dpo", "kto", "rm")
# LLaMA-Factory's identity.json ships "{{name}}" / "{{author}}" for the user to replace; trained as
# they are, the model introduces itself as "{{name}}"
PLACEHOLDER = re.compile(r"\{\{\s*[^{}\s]{1,40}\s*\}\}")


@dataclass
class Examples:
    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def subset(self, indices: list[int]) -> Examples:
        return Examples([self.input_ids[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class DataStats:
    reports: list[LoadReport] = field(default_factory=list)
    records: int = 0
    truncated: int = 0
    dropped_empty: int = 0  # truncation left no answer token to learn
    full_lengths: list[int] = field(default_factory=list)  # sft: token lengths before truncation
    problems: str = ""  # skipped invalid records, grouped by reason ("" when none)
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)  # sampling, pairing: what was done to the records
    placeholders: Counter = field(default_factory=Counter)  # "{{name}}" → records holding it
    placeholder_records: int = 0
    pref: PrefStats | None = None  # dpo / kto / rm: lengths, truncation, ties

    def placeholder_warning(self) -> str:
        if not self.placeholder_records:
            return ""
        shown = ", ".join(f"{name} ×{count}" for name, count in self.placeholders.most_common(5))
        return (f"warning: {self.placeholder_records} records hold {{{{…}}}} placeholders ({shown}) — "
                "LLaMA-Factory's identity.json expects them replaced with your model's name and author "
                "before training; as they are, the model learns the literal text")

    def describe(self, examples: Examples, config: Config) -> str:
        """One progress line about the tokenized data, plus what was skipped."""
        unit = {"pt": "blocks", "dpo": "pairs", "rm": "pairs"}.get(config.stage, "examples")
        line = f"data: {self.records} records → {len(examples)} {unit}"
        if self.truncated:
            line += f", {self.truncated} truncated by data.cutoff_len={config.data.cutoff_len}"
        if self.dropped_empty:
            line += f", {self.dropped_empty} dropped (no answer left after truncation)"
        if isinstance(examples, PairExamples) and examples.ties:
            line += f", {examples.ties} ties (chosen == rejected: no preference to learn)"
        line += " (tokenized earlier, from the cache)" if self.from_cache else ""
        extra = [*self.notes, self.problems, self.placeholder_warning()]
        return "\n".join([line, *(text for text in extra if text)])


def cache_dir(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge")) / "tokenized"


def _tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                              getattr(tokenizer, "add_bos_token", None)]).encode())
    return digest.hexdigest()


def cache_key(config: Config, tokenizer, specs: list[DatasetSpec]) -> str:
    data = config.data
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "format": CACHE_FORMAT, "stage": config.stage, "template": jinja_template(template_of(data)),
        "cutoff": data.cutoff_len, "block": data.block_size, "train_on_prompt": data.train_on_prompt,
        "mask_history": data.mask_history, "max_samples": data.max_samples, "skip_invalid": data.skip_invalid,
        "seed": config.train.seed,  # dataset_info.json num_samples draws with it
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }, sort_keys=True).encode())
    for spec in specs:
        digest.update(json.dumps([spec.name, spec.formatting, spec.columns, spec.tags, spec.kind, spec.num_samples,
                                  spec.split, spec.subset], sort_keys=True).encode())
        files = sorted(spec.path.rglob("*")) if spec.path.is_dir() else [spec.path]
        for path in files:
            if path.is_file():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


def _save(path: Path, examples: Examples, stats: DataStats) -> None:
    lengths = np.array([len(x) for x in examples.input_ids], dtype=np.int64)
    flat = lambda rows: np.array([t for row in rows for t in row], dtype=np.int32)  # noqa: E731
    meta = {"records": stats.records, "truncated": stats.truncated, "dropped_empty": stats.dropped_empty,
            "problems": stats.problems, "notes": stats.notes, "placeholders": dict(stats.placeholders),
            "placeholder_records": stats.placeholder_records}
    # each process its own temporary name: under torchrun every rank writes the same entry
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, lengths=lengths, ids=flat(examples.input_ids), labels=flat(examples.labels),
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    tmp.replace(path)


def _load(path: Path) -> tuple[Examples, DataStats]:
    with np.load(path, allow_pickle=False) as npz:
        bounds = np.concatenate([[0], np.cumsum(npz["lengths"])])
        ids, labels = npz["ids"].tolist(), npz["labels"].tolist()
        meta = json.loads(npz["meta"].tobytes().decode())
    rows = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    examples = Examples([ids[a:b] for a, b in rows], [labels[a:b] for a, b in rows])
    stats = DataStats(records=meta["records"], truncated=meta["truncated"], dropped_empty=meta["dropped_empty"],
                      problems=meta["problems"], from_cache=True, notes=meta.get("notes", []),
                      placeholders=Counter(meta.get("placeholders", {})),
                      placeholder_records=meta.get("placeholder_records", 0))
    return examples, stats


def resolve_specs(config: Config) -> list[DatasetSpec]:
    return resolve_datasets(Path(config.data.dir) if config.data.dir else None, config.data.datasets)


def load_reports(config: Config, specs: list[DatasetSpec]) -> list[LoadReport]:
    reports = load_datasets(specs, stage=config.stage, skip_invalid=config.data.skip_invalid,
                            seed=config.train.seed, score_threshold=config.pref.score_threshold)
    if config.data.max_samples:
        for report in reports:
            report.records = report.records[: config.data.max_samples]
    return reports


def record_texts(record) -> list[str]:
    """Every piece of text a record trains on (what the placeholder scan reads)."""
    if isinstance(record, Text):
        return [record.text]
    if isinstance(record, Preference):
        return [*record_texts(record.prompt), record.chosen, record.rejected]
    if isinstance(record, Feedback):
        return record_texts(record.conversation)
    return [record.system or "", *(turn.text for turn in record.turns)]


def count_placeholders(records: list, stats: DataStats) -> None:
    for record in records:
        found = {match.group(0) for text in record_texts(record) for match in PLACEHOLDER.finditer(text)}
        stats.placeholders.update(found)
        stats.placeholder_records += bool(found)


def tokenize_reports(config: Config, tokenizer, reports: list[LoadReport]) -> tuple[Examples, DataStats]:
    problems = [p for r in reports for p in r.problems]
    stats = DataStats(reports=reports, records=sum(len(r.records) for r in reports),
                      problems=summarize_problems(problems) if problems else "",
                      notes=[f"{r.name}: {note}" for r in reports for note in r.notes])
    records = [rec for r in reports for rec in r.records]
    count_placeholders(records, stats)
    if config.stage in PREFERENCE_STAGES:
        return _tokenize_preference(config, tokenizer, records, stats)
    if config.stage == "pt":
        texts = [rec.text for rec in records if isinstance(rec, Text)]
        blocks = encode_text_blocks(tokenizer, texts, config.data.block_size or config.data.cutoff_len)
        return Examples(blocks, [list(b) for b in blocks]), stats
    template = template_of(config.data)
    ids, labels = [], []
    for rec in records:
        assert isinstance(rec, Conversation)
        enc = encode_conversation(tokenizer, template, rec, cutoff_len=config.data.cutoff_len,
                                  train_on_prompt=config.data.train_on_prompt, mask_history=config.data.mask_history)
        if enc is None:
            stats.dropped_empty += 1
            continue
        stats.full_lengths.append(enc.full_length)
        stats.truncated += is_truncated(enc)
        ids.append(enc.input_ids)
        labels.append(enc.labels)
    if not ids:
        raise LoraforgeError(
            f"no example has an answer token left within data.cutoff_len={config.data.cutoff_len}: raise cutoff_len")
    return Examples(ids, labels), stats


def _tokenize_preference(config: Config, tokenizer, records: list,
                         stats: DataStats) -> tuple[PairExamples | FeedbackExamples, DataStats]:
    template = template_of(config.data)
    stats.pref = PrefStats()
    if config.stage == "kto":
        examples = encode_feedback(tokenizer, template, records, config.data.cutoff_len, stats.pref)
    else:
        examples = encode_pairs(tokenizer, template, records, config.data.cutoff_len, stats.pref)
    stats.truncated, stats.dropped_empty = stats.pref.truncated, stats.pref.dropped
    if not len(examples):
        raise LoraforgeError(f"no example has an answer token left within data.cutoff_len={config.data.cutoff_len}: "
                             "every prompt fills it — raise cutoff_len")
    return examples, stats


def build_examples(config: Config, tokenizer) -> tuple[Examples, DataStats]:
    """All tokenized examples for the config, from the cache when the inputs are unchanged."""
    if config.stage in PREFERENCE_STAGES:
        return tokenize_reports(config, tokenizer, load_reports(config, resolve_specs(config)))
    specs = resolve_specs(config)
    path = cache_dir(config) / f"{cache_key(config, tokenizer, specs)}.npz"
    if path.exists():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            path.unlink(missing_ok=True)  # damaged or from an older loraforge: tokenize again
    examples, stats = tokenize_reports(config, tokenizer, load_reports(config, specs))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, examples, stats)
    return examples, stats


def split_eval(examples: Examples, val_size: float, seed: int) -> tuple[Examples, Examples | None]:
    """Hold out a fraction (<1) or a count (>=1) of examples for eval loss."""
    if val_size <= 0:
        return examples, None
    count = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if count >= len(examples):
        raise LoraforgeError(f"data.val_size={val_size} holds out {count} of {len(examples)} examples: nothing left to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return examples.subset(sorted(order[count:])), examples.subset(sorted(order[:count]))
