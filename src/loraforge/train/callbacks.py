"""What a run writes while it trains: trainer_log.jsonl and loss.png.

One JSON line per logging step (step, loss, eval_loss, lr, epoch, tokens/s, elapsed,
remaining) so a run can be followed with `tail -f` and plotted afterwards. Preference
stages add TRL's own metrics under TRL's names (dpo/kto: rewards/margins,
rewards/accuracies, rewards/chosen, rewards/rejected, kl; rm: accuracy, margin), and
loss.png draws the margins and accuracies in a second panel.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

# TRL's metric names worth keeping per step (and their eval_ twins)
PREFERENCE_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                      "logps/chosen", "logps/rejected", "kl", "accuracy", "margin", "nll_loss")
MARGIN_KEYS = ("rewards/margins", "margin")
ACCURACY_KEYS = ("rewards/accuracies", "accuracy")


class JsonlLogger(TrainerCallback):
    """Append one line per Trainer log event to `trainer_log.jsonl` (main process only)."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.perf_counter()
        self.last_time = self.start
        self.last_tokens = 0
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen or 0
        # after a resume global_step starts at the checkpoint's step but the clock starts at 0:
        # the rate is measured over the steps this process ran
        self.start_step = state.global_step
        if state.global_step and state.is_world_process_zero:
            drop_rows_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        tokens = state.num_input_tokens_seen or 0
        window = now - self.last_time
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss"):
            if key in logs:
                record["lr" if key == "learning_rate" else key] = float(logs[key])
        for key in PREFERENCE_METRICS:
            for name in (key, f"eval_{key}"):
                if name in logs:
                    record[name] = round(float(logs[name]), 6)
        if "loss" in logs and window > 0:
            record["tokens_per_s"] = round((tokens - self.last_tokens) / window, 1)
            self.last_time, self.last_tokens = now, tokens
        record["elapsed_s"] = round(elapsed, 2)
        record["remaining_s"] = remaining_seconds(elapsed, self.start_step, state.global_step, state.max_steps)
        record["tokens_seen"] = tokens
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def remaining_seconds(elapsed: float, start_step: int, step: int, max_steps: int) -> float | None:
    """Time left at the rate of the steps run since `start_step` (this process's first step)."""
    ran = step - start_step
    if not max_steps or ran <= 0:
        return None
    return round(elapsed / ran * max(max_steps - step, 0), 2)


def drop_rows_after(path: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps the resumed run trains again: keep the
    log up to the checkpoint, so each step appears once and the curve reads as one run."""
    rows = read_log(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(path)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Raw and smoothed training loss, and eval loss when present."""
    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*train)
    margins = _series(rows, MARGIN_KEYS)
    accuracies = _series(rows, ACCURACY_KEYS)
    if margins or accuracies:
        fig, (ax, pref_ax) = plt.subplots(2, 1, figsize=(7, 7), dpi=110, sharex=True)
        _plot_preference(pref_ax, margins, accuracies)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#9ab", linewidth=1, label="train loss")
    ax.plot(steps, smooth(list(losses)), color="#15c", linewidth=2, label="train loss (smoothed)")
    if evals:
        eval_steps, eval_losses = zip(*evals)
        ax.plot(eval_steps, eval_losses, "o-", color="#d52", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or out_png.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _series(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[int, float]]:
    """(step, value) of the first of `keys` the log has (dpo/kto and rm name the same thing differently)."""
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            return points
    return []


def _plot_preference(ax, margins: list[tuple[int, float]], accuracies: list[tuple[int, float]]) -> None:
    """Reward margin (chosen − rejected) and preference accuracy per logging step: the curves that say a
    preference run learns, where the loss alone does not."""
    if margins:
        steps, values = zip(*margins)
        ax.plot(steps, smooth(list(values)), color="#15c", linewidth=2, label="reward margin (smoothed)")
        ax.set_ylabel("reward margin")
    if accuracies:
        right = ax.twinx()
        steps, values = zip(*accuracies)
        right.plot(steps, smooth(list(values)), color="#d52", linewidth=2, label="accuracy (smoothed)")
        right.set_ylim(-0.05, 1.05)
        right.set_ylabel("preference accuracy")
        right.legend(loc="lower right")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if margins:
        ax.legend(loc="upper left")
