"""Command-line flags shared by `chat`, `generate` (and `serve`): the model and the generation parameters.

Generation flags are made from GenerationConfig's fields, so a new parameter is a flag
everywhere at once, with the help its field carries.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from loraforge.infer.engine import GenerationConfig, open_engine


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a HF model dir, an adapter dir (its base is loaded) or a .gguf file")
    parser.add_argument("--engine", choices=["auto", "llamacpp", "hf", "vllm"], default="auto",
                        help="auto: llama.cpp for .gguf, transformers (+peft) for directories")
    parser.add_argument("--base", default=None, help="base model dir of an adapter (default: its adapter_config.json's)")
    parser.add_argument("--adapter", default="", help="more adapters on top, comma-separated (peft dirs; "
                                                      "one llama.cpp adapter .gguf for a .gguf model)")
    parser.add_argument("--n-ctx", type=int, default=None, help="context window in tokens (default: the model's)")
    parser.add_argument("--template", default=None,
                        help="a loraforge chat template name to use instead of the model's own")
    parser.add_argument("--device", default=None, help="transformers engine: cpu or cuda (default: cuda if present)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    for f in fields(GenerationConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.name == "stop":
            group.add_argument(flag, action="append", default=None, metavar="TEXT",
                               help=f.metadata["help"] + " (repeat the flag for several)")
        else:
            kind = int if f.name in ("max_new_tokens", "top_k", "seed", "num_beams", "no_repeat_ngram_size") else float
            group.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default {default})")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The flags given; unset ones keep GenerationConfig's defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(GenerationConfig) if getattr(args, f.name, None) is not None}
    return GenerationConfig(**given)


def engine_from(args: argparse.Namespace):
    adapters = [a for a in (args.adapter or "").split(",") if a]
    return open_engine(args.model, engine=args.engine, adapters=adapters, n_ctx=args.n_ctx, template=args.template,
                       base=args.base, device=args.device)
