"""`loraforge train` for the preference stages, on TRL: dpo, kto and rm.

Reads top to bottom like run.py: tokenizer (with the template) → pairs or feedback,
tokenized by data/preference.py → base model → TRL trainer → the same run directory as
SFT (adapter or model, tokenizer with the chat template, loraforge.yaml,
trainer_log.jsonl with reward margins/accuracies, trained_on.json, loss.png).

Which TRL 1.16 trainer does what:

| config | trainer | LLaMA-Factory's keys |
|---|---|---|
| stage dpo, pref.loss sigmoid / ipo | `trl.DPOTrainer`, `loss_type` sigmoid / ipo (+ "sft" weighted by ftx) | pref_loss, pref_beta, pref_ftx |
| stage dpo, pref.loss orpo | `trl.experimental.orpo.ORPOTrainer` (no reference model; beta is ORPO's λ) | pref_beta |
| stage dpo, pref.loss simpo | `trl.experimental.cpo.CPOTrainer`, loss_type simpo, cpo_alpha = ftx | pref_beta, simpo_gamma, pref_ftx |
| stage kto | `trl.KTOTrainer` | pref_beta, kto_chosen_weight, kto_rejected_weight |
| stage rm | `trl.RewardTrainer` on `AutoModelForSequenceClassification(num_labels=1)`; LoRA keeps the `score` head in modules_to_save | — |

TRL 1.16 offers ORPO and SimPO only under `trl.experimental` (CPO's `simpo` loss is SimPO);
those are the current homes, not deprecated paths.

Prompt ids equal SFT's: TRL is handed token ids, never text. data/preference.py renders
prompt + answer with our template and encodes it segment by segment as SFT does; the
trainers here take those ids as they are — `_prepare_dataset` (DPO, KTO) or `tokenize_row`
(ORPO, CPO) is replaced by a pass-through, and RewardTrainer skips its own tokenization
when `chosen_ids`/`rejected_ids` are present. Truncation to data.cutoff_len happened there
too, so TRL's `max_length` is off.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

import torch

from loraforge.config import Config
from loraforge.data.preference import FeedbackExamples, PairExamples
from loraforge.errors import LoraforgeError
from loraforge.train.callbacks import JsonlLogger, read_log

PREF_METHODS = ("lora", "qlora", "full")


def _trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO/CPO live there; we say so in the docs
    try:
        import trl
    except ImportError:
        raise LoraforgeError("stages dpo, kto and rm need TRL: pip install 'trl>=1.16,<1.17'") from None
    return trl


def check_preference_config(config: Config) -> None:
    from loraforge.data.packing import packing_enabled

    packing_enabled(config)  # refuses data.packing / neat_packing: pairs and scored answers are batched as they are
    if config.method not in PREF_METHODS:
        raise LoraforgeError(f"stage {config.stage} trains with method lora, qlora or full, not {config.method} — "
                             "set method: lora (or full)")
    if config.stage != "dpo" and config.pref.loss != "sigmoid":
        raise LoraforgeError(f"pref.loss={config.pref.loss} is a dpo loss; stage {config.stage} has its own — "
                             "drop pref.loss (LLaMA-Factory: pref_loss) or use stage: dpo")


def kto_micro_batch(config: Config) -> tuple[Config, str | None]:
    """KTO's KL term is estimated from the other answers of the same micro-batch (TRL's rule), so
    one example per micro-batch has none. LLaMA-Factory's KTO examples say batch size 1 with
    gradient accumulation 8: that becomes 2 × 4, the same examples per optimizer step, with a note
    (an odd accumulation count cannot keep the step size: it says so)."""
    train = config.train
    if config.stage != "kto" or train.batch_size > 1:
        return config, None
    accum = max(1, train.grad_accum // 2)
    new = config.model_copy(update={"train": train.model_copy(update={"batch_size": 2, "grad_accum": accum})})
    same = "the same" if train.grad_accum % 2 == 0 else f"{2 * accum} instead of {train.grad_accum}"
    return new, (f"stage kto: train.batch_size 1 → 2 and gradient accumulation {train.grad_accum} → {accum} "
                 f"({same} examples per optimizer step): KTO's KL term is estimated from the other answers "
                 "in a micro-batch, and one example has none")


def _config_class(config: Config):
    trl = _trl()
    if config.stage == "kto":
        return trl.KTOConfig
    if config.stage == "rm":
        return trl.RewardConfig
    if config.pref.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    if config.pref.loss == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig
    return trl.DPOConfig


def trl_arguments(config: Config, output_dir: Path, has_eval: bool):
    """The run's TrainingArguments (run.py: one place for batch, lr, precision, saving…) as the TRL config
    of the stage, plus the preference settings with LLaMA-Factory's meanings."""
    from transformers import TrainingArguments

    from loraforge.train.run import training_arguments

    base = training_arguments(config, output_dir, has_eval)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    pref = config.pref
    if config.stage == "kto":
        # the KL answers are fixed neighbours in a batch: TRL needs the order kept (we shuffle beforehand)
        extra = {"beta": pref.beta, "desirable_weight": pref.kto_chosen_weight,
                 "undesirable_weight": pref.kto_rejected_weight, "max_length": None,
                 "train_sampling_strategy": "sequential"}
    elif config.stage == "rm":
        extra = {"max_length": None}
    elif pref.loss == "orpo":
        extra = {"beta": pref.beta, "max_length": 10**9}
    elif pref.loss == "simpo":
        extra = {"beta": pref.beta, "loss_type": "simpo", "simpo_gamma": pref.simpo_gamma,
                 "cpo_alpha": pref.ftx, "max_length": 10**9}
    else:
        losses, weights = [pref.loss], [1.0]
        if pref.ftx > 0:  # LLaMA-Factory's pref_ftx: an SFT loss on the chosen answer, weighted
            losses, weights = [pref.loss, "sft"], [1.0, pref.ftx]
        extra = {"beta": pref.beta, "loss_type": losses, "loss_weights": weights, "max_length": None}
    if config.stage != "rm" and not (config.stage == "dpo" and pref.loss in ("orpo", "simpo")):
        extra["precompute_ref_log_probs"] = False
    # train.group_by_length sorts by 'input_ids', which pairs do not have
    extra.setdefault("train_sampling_strategy", "random")
    return _config_class(config)(**{**common, **extra})


def _trainer_class(config: Config):
    """The TRL trainer, taking our token ids as they are (see the module docstring)."""
    trl = _trl()
    if config.stage == "rm":
        return trl.RewardTrainer
    if config.stage == "kto":
        class KTOOnIds(trl.KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                size = args.per_device_train_batch_size

                # TRL's rule: each answer's KL partner is the previous answer in its batch (rotated by one)
                def add_kl(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                return dataset.map(add_kl, batched=True, batch_size=size)

        return KTOOnIds
    if config.pref.loss in ("orpo", "simpo"):
        if config.pref.loss == "orpo":
            from trl.experimental.orpo import ORPOTrainer as Base
        else:
            from trl.experimental.cpo import CPOTrainer as Base

        class PairsOnIds(Base):
            def tokenize_row(self, feature, model=None):
                return _legacy_pair_row(feature)

        return PairsOnIds

    class DPOOnIds(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return DPOOnIds


def _legacy_pair_row(feature: dict) -> dict:
    """The fields ORPO/CPO's own tokenize_row would give, from our ids (labels -100 over the prompt)."""
    prompt, row = feature["prompt_ids"], {}
    for side in ("chosen", "rejected"):
        ids = prompt + feature[f"{side}_ids"]
        row[f"{side}_input_ids"] = ids
        row[f"{side}_attention_mask"] = [1] * len(ids)
        row[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
    row["prompt_input_ids"], row["prompt_attention_mask"] = prompt, [1] * len(prompt)
    return row


def _dataset(examples: PairExamples | FeedbackExamples, config: Config, shuffle: bool):
    from datasets import Dataset

    rows = examples.rows()
    if config.stage == "rm":
        rows = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
                for r in rows]
    dataset = Dataset.from_list(rows)
    # KTO reads its data in order (its KL partners are fixed neighbours): shuffle once here, seeded
    return dataset.shuffle(seed=config.train.seed) if shuffle else dataset


def load_reward_base(config: Config):
    """The base model with a one-output value head (`score`) on the last token: a reward model."""
    from transformers import AutoModelForSequenceClassification

    from loraforge.train.methods import check_model_dir, compute_dtype

    check_model_dir(config.model.path)
    dtype = torch.float32 if config.method == "full" else compute_dtype(config)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            config.model.path, num_labels=1, dtype=dtype, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LoraforgeError(f"model.path={config.model.path}: cannot load it as a reward model ({exc})") from None


def _peft_config(model, config: Config, steps: int):
    from loraforge.train.methods import peft_config

    if config.method == "full":
        return None
    peft = peft_config(model, config, steps)
    if config.stage == "rm":
        # the value head is new: it must be trained in full and saved with the adapter
        peft.task_type = "SEQ_CLS"
        peft.modules_to_save = list(dict.fromkeys([*(peft.modules_to_save or []), "score"]))
    return peft


def train_preference(config: Config):
    """Preference-tune `model.path` (stage dpo, kto or rm); returns run.py's RunResult."""
    from transformers import set_seed

    from loraforge.train.methods import load_base_model, trainable_summary
    from loraforge.train.run import (
        LOG_NAME,
        RunResult,
        check_vocab_fits,
        last_eval_step,
        optimizer_steps,
        pad_id,
        prepare_run,
        save_run,
    )

    main_process = int(os.environ.get("RANK", "0")) == 0
    check_preference_config(config)
    config, note = kto_micro_batch(config)
    if note and main_process:
        print(f"note: {note}", file=sys.stderr)
    output_dir, resume, tokenizer, train_set, eval_set = prepare_run(config)

    set_seed(config.train.seed)
    model = load_reward_base(config) if config.stage == "rm" else load_base_model(config)
    check_vocab_fits(model, tokenizer, config)
    peft = _peft_config(model, config, optimizer_steps(config, len(train_set)))
    # TRL sets a missing pad token to EOS on the tokenizer it is given; the run keeps the tokenizer as it was
    # (what SFT saves), and the reward model reads its score at the last token before padding — pad with
    # loraforge's pad rule (pad → unk → eos) so a final EOS is never taken for padding where unk exists
    trl_tokenizer = copy.deepcopy(tokenizer)
    if trl_tokenizer.pad_token is None:
        trl_tokenizer.pad_token = trl_tokenizer.convert_ids_to_tokens(pad_id(tokenizer))

    output_dir.mkdir(parents=True, exist_ok=True)
    args = trl_arguments(config, output_dir, has_eval=eval_set is not None)
    log_path = output_dir / LOG_NAME
    if args.process_index == 0 and resume is None:
        log_path.unlink(missing_ok=True)
    shuffle = config.stage == "kto"
    trainer = _trainer_class(config)(
        model=model, args=args, train_dataset=_dataset(train_set, config, shuffle),
        eval_dataset=_dataset(eval_set, config, shuffle) if eval_set is not None else None,
        processing_class=trl_tokenizer, peft_config=peft, callbacks=[JsonlLogger(log_path)])
    if main_process:
        trainable, total = trainable_summary(trainer.model)
        print(f"{config.stage} · {config.method}: training {trainable:,} of {total:,} parameters "
              f"({100 * trainable / total:.2f}%)", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    if eval_set is not None and last_eval_step(log_path) != result.global_step:
        trainer.evaluate()

    if trainer.is_world_process_zero():
        save_run(trainer, tokenizer, config, output_dir)
    rows = read_log(log_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return RunResult(output_dir, result.global_step, losses[0] if losses else None,
                     losses[-1] if losses else None, len(train_set), evals[-1] if evals else None)


def reward_run(run_dir: Path) -> dict:
    """A stage rm run's saved config; anything else is refused, naming what it is."""
    import yaml

    from loraforge.models import check_model_dir

    check_model_dir(run_dir, "the reward model run")
    saved = yaml.safe_load((run_dir / "loraforge.yaml").read_text(encoding="utf-8")) \
        if (run_dir / "loraforge.yaml").is_file() else {}
    if saved.get("stage") != "rm":
        raise LoraforgeError(f"{run_dir} is not a reward model run (its loraforge.yaml says stage "
                             f"{saved.get('stage', '—')}): train one with stage: rm")
    return saved


def score_file(run_dir: Path, names: list[str], data_dir: Path | None, output: Path) -> str:
    """`loraforge score`: the reward of every answer in data files (or dataset_info.json names) —
    both answers of each chosen/rejected pair, or the last answer of each conversation — written
    as jsonl (one line per record, in order); returns the summary line (pairs ranked right)."""
    import json

    from loraforge.data.preference import answered
    from loraforge.data.records import Preference
    from loraforge.data.registry import load_datasets, resolve_datasets
    from loraforge.outputs import write_text

    run_dir = Path(run_dir)
    reward_run(run_dir)
    specs = resolve_datasets(data_dir, names)
    records = []
    for spec in specs:
        [report] = load_datasets([spec], stage="sft" if spec.kind == "plain" else "rm", skip_invalid=False)
        records += report.records
    texts = []
    for record in records:
        texts += [answered(record.prompt, record.chosen), answered(record.prompt, record.rejected)] \
            if isinstance(record, Preference) else [record]
    rewards = iter(score(run_dir, texts))
    lines, pairs, right = [], 0, 0
    for record in records:
        if isinstance(record, Preference):
            chosen, rejected = next(rewards), next(rewards)
            pairs, right = pairs + 1, right + (chosen > rejected)
            lines.append({"source": record.source, "chosen": chosen, "rejected": rejected})
        else:
            lines.append({"source": record.source, "reward": next(rewards)})
    write_text(output, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    summary = f"scored {len(texts)} answers → {output}"
    if pairs:
        summary += f"; chosen above rejected in {right} of {pairs} pairs ({100 * right / pairs:.1f}%)"
    return summary


def score(run_dir: Path, texts: list) -> list[float]:
    """Rewards from a stage rm run for `texts`: a str is scored as it is (BOS added), a Conversation
    ending with an answer is rendered by the run's template exactly as in training."""
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from loraforge.data.preference import prompt_and_answer
    from loraforge.data.records import Conversation
    from loraforge.data.templates import get_template
    from loraforge.tokenizer import load_tokenizer as load_folder_tokenizer
    from loraforge.train.run import pad_id

    run_dir = Path(run_dir)
    saved = reward_run(run_dir)
    tokenizer = load_folder_tokenizer(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the base has no score head yet: the adapter brings the trained one
        try:
            base = AutoModelForSequenceClassification.from_pretrained(saved["model"]["path"], num_labels=1,
                                                                      dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        model = PeftModel.from_pretrained(base, run_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run_dir, num_labels=1, dtype=torch.float32)
    pad = pad_id(tokenizer)
    model.config.pad_token_id = pad
    model.eval()
    template = get_template(saved["data"]["template"])
    rewards = []
    for text in tqdm(texts, desc="score", unit="text", disable=len(texts) < 8):
        if isinstance(text, Conversation):
            prompt, answer = prompt_and_answer(tokenizer, template, dataclasses.replace(text, turns=text.turns[:-1]),
                                               text.turns[-1].text)
            ids = prompt + answer
        else:
            ids = tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            rewards.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return rewards
