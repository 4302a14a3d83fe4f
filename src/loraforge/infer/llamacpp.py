"""Answer prompts with llama.cpp (llama-cpp-python) from a GGUF file.

The prompt is rendered with the template the model was trained with, the same function
training used, so an exported model is asked exactly what the trained one was.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.data.records import Turn
from loraforge.data.templates import Template, render_prompt


def load_gguf(path: Path, n_ctx: int = 1024):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)


def greedy_answer_gguf(llm, template: Template, question: str, system: str | None = None,
                       max_new_tokens: int = 64) -> str:
    eos = llm.detokenize([llm.token_eos()]).decode("utf-8", errors="replace")
    bos = llm.detokenize([llm.token_bos()]).decode("utf-8", errors="replace")
    prompt = render_prompt(template, system, [Turn("user", question)], eos, bos_token=bos)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                stop=list(template.stop_strings) or None)
    return out["choices"][0]["text"]
