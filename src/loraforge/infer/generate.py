"""`loraforge generate MODEL --input prompts.jsonl -o predictions.jsonl`: batch generation over a file.

One request per line, in any of the shapes the data stage reads:
  {"instruction": …, "input": …, "system": …}      Alpaca (instruction and input joined by a newline)
  {"messages": [{"role": …, "content": …}, …]}      OpenAI
  {"conversations": [{"from": "human", "value": …}, …], "system": …}   ShareGPT
  {"prompt": …}                                     raw text, no chat template
A trailing assistant turn (or Alpaca's "output") is the reference answer: it is not sent,
and stays in the output line. Every line is checked before the first is generated; each
output line is the input record plus "prediction", "finish_reason" and "completion_tokens".
The output is written under a temporary name and renamed when complete, and the
generation parameters go to `<OUT>.generation.json` beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import Engine, GenerationConfig, message_text
from loraforge.infer.llamacpp import UnsupportedOption
from loraforge.outputs import new_file, write_text
from loraforge.textfiles import read_text

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


@dataclass
class GenerateResult:
    output: Path
    config_path: Path
    requests: int
    completion_tokens: int
    seconds: float


def request_of(record, where: str) -> list[dict] | str:
    """The chat messages (or raw prompt) one input line asks for."""
    if not isinstance(record, dict):
        raise LoraforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise LoraforgeError(f"{where}: 'prompt' must be a string")
        return record["prompt"]
    system = record.get("system") or None
    if "instruction" in record:
        parts = [record.get("instruction"), record.get("input")]
        if not all(isinstance(p, (str, type(None))) for p in parts) or not record["instruction"]:
            raise LoraforgeError(f"{where}: 'instruction' must be a non-empty string (and 'input' a string)")
        messages = [{"role": "user", "content": "\n".join(p for p in parts if p)}]
    elif "messages" in record:
        messages = _messages(record["messages"], where, "role", "content", {r: r for r in ("system", "user", "assistant")})
    elif "conversations" in record:
        messages = _messages(record["conversations"], where, "from", "value", _SHAREGPT_ROLES)
    else:
        raise LoraforgeError(f"{where}: no 'instruction', 'messages', 'conversations' or 'prompt' field "
                             f"(found: {', '.join(record) or 'nothing'})")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    while messages and messages[-1]["role"] == "assistant":  # the reference answer
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise LoraforgeError(f"{where}: the conversation has no user message to answer")
    return messages


def _messages(items, where: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise LoraforgeError(f"{where}: expected a non-empty list of messages")
    out = []
    for index, item in enumerate(items, 1):
        if not isinstance(item, dict) or item.get(role_key) not in roles or text_key not in item:
            raise LoraforgeError(f"{where}: message {index} needs '{role_key}' (one of {', '.join(roles)}) "
                                 f"and '{text_key}'")
        try:
            out.append({"role": roles[item[role_key]], "content": message_text(item[text_key])})
        except LoraforgeError as exc:
            raise LoraforgeError(f"{where}: message {index}: {exc}") from None
    return out


def read_requests(path: Path) -> list[tuple[int, dict, list[dict] | str]]:
    """(line number, record, request) for every non-empty line; the first bad line is an error."""
    if not path.exists():
        raise LoraforgeError(f"{path}: no such input file")
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoraforgeError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}) — "
                                 "one JSON object per line") from None
        rows.append((number, record, request_of(record, where)))
    if not rows:
        raise LoraforgeError(f"{path}: no requests (one JSON object per line)")
    return rows


def generate_file(engine: Engine, input_path: Path, output_path: Path, config: GenerationConfig) -> GenerateResult:
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    rows = read_requests(input_path)
    tokens, start = 0, time.perf_counter()
    with new_file(output_path) as partial:
        with open(partial, "w", encoding="utf-8") as out, \
                tqdm(rows, desc="generate", unit="prompt", dynamic_ncols=True) as progress:
            for number, record, request in progress:
                try:
                    done = engine.complete(request, config)
                except UnsupportedOption:
                    raise
                except LoraforgeError as exc:
                    raise LoraforgeError(f"{input_path}:{number}: {exc}") from None
                tokens += len(done.token_ids)
                out.write(json.dumps({**record, "prediction": done.text, "finish_reason": done.finish_reason,
                                      "completion_tokens": len(done.token_ids)}, ensure_ascii=False) + "\n")
                progress.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s")
        seconds = time.perf_counter() - start
        config_path = output_path.with_name(output_path.name + ".generation.json")
        write_text(config_path, json.dumps({
            "model": engine.model_name, "engine": engine.name, "n_ctx": engine.n_ctx, "input": str(input_path),
            "output": str(output_path), "requests": len(rows), "completion_tokens": tokens,
            "seconds": round(seconds, 3), "generation": config.to_dict()}, ensure_ascii=False, indent=2) + "\n")
    return GenerateResult(output_path, config_path, len(rows), tokens, seconds)
