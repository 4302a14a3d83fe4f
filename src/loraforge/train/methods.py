"""Load the base model and wrap it for the chosen fine-tuning method.

lora / qlora / adalora adapt linear layers; prompt_tuning / prefix_tuning / p_tuning
learn virtual tokens; full trains every weight. `modules_to_save` (embed_tokens,
lm_head) is trained in full next to any adapter — how an extended vocabulary learns.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.config import Config
from loraforge.errors import LoraforgeError

PEFT_METHODS = {"lora", "qlora", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning"}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def compute_dtype(config: Config) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported, else fp16 (unless the config says)."""
    precision = config.train.precision
    if precision == "auto":
        if not has_cuda():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("bf16", "fp16") and not has_cuda():
        raise LoraforgeError(
            f"train.precision={precision} needs a CUDA GPU; on CPU use train.precision=fp32 (or auto)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_model_dir(path: str, key: str = "model.path") -> None:
    from loraforge.models import check_model_dir as check

    check(path, key)


def load_base_model(config: Config):
    from transformers import AutoModelForCausalLM

    check_model_dir(config.model.path)

    kwargs: dict = {"trust_remote_code": config.model.trust_remote_code}
    dtype = compute_dtype(config)
    if config.method == "qlora":
        if not has_cuda():
            raise LoraforgeError(
                "method: qlora loads the base model in 4-bit NF4 with bitsandbytes, which needs a CUDA GPU; "
                "on CPU use method: lora (same adapter, full-precision base)")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:  # pragma: no cover - only on exotic installs
            raise LoraforgeError("method: qlora needs bitsandbytes: pip install 'loraforge[gpu]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    # full fine-tuning in half precision without master weights diverges; keep fp32 weights
    # and let autocast (Trainer bf16/fp16) do the fast math
    kwargs["dtype"] = torch.float32 if config.method == "full" else dtype
    try:
        return AutoModelForCausalLM.from_pretrained(config.model.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraforgeError(f"model.path={config.model.path}: cannot load a model there ({exc})") from None


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer but the output head: what `target: all` adapts."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            names.add(name.rsplit(".", 1)[-1])
        elif type(module).__name__ in ("Linear4bit", "Linear8bitLt") and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def target_modules(model, config: Config) -> list[str]:
    if config.lora.target == ["all"]:
        return linear_module_names(model)
    known = set(linear_module_names(model))
    unknown = [t for t in config.lora.target if t not in known]
    if unknown:
        raise LoraforgeError(
            f"lora.target: {', '.join(unknown)} is not a linear layer of this model; "
            f"choose from {', '.join(sorted(known))} or 'all'")
    return config.lora.target


def peft_config(model, config: Config, total_steps: int):
    """The peft config object for the method."""
    import peft

    lora = config.lora
    common = {"task_type": peft.TaskType.CAUSAL_LM}
    to_save = lora.modules_to_save or None
    if config.method in ("lora", "qlora"):
        return peft.LoraConfig(
            r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, lora_dropout=lora.dropout,
            target_modules=target_modules(model, config), use_dora=lora.use_dora,
            use_rslora=lora.use_rslora, modules_to_save=to_save, **common)
    if config.method == "adalora":
        return peft.AdaLoraConfig(
            init_r=lora.r, target_r=lora.adalora_target_r, lora_alpha=lora.alpha or 2 * lora.r,
            lora_dropout=lora.dropout, target_modules=target_modules(model, config),
            total_step=max(total_steps, 3), tinit=0, tfinal=0, deltaT=1,
            modules_to_save=to_save, **common)
    virtual = {"num_virtual_tokens": lora.num_virtual_tokens, **common}
    if config.method == "prompt_tuning":
        return peft.PromptTuningConfig(**virtual)
    if config.method == "prefix_tuning":
        return peft.PrefixTuningConfig(**virtual)
    if config.method == "p_tuning":
        return peft.PromptEncoderConfig(encoder_hidden_size=model.config.hidden_size, **virtual)
    raise AssertionError(config.method)


def apply_method(model, config: Config, total_steps: int):
    """Wrap the model for training; returns the model the Trainer should see."""
    if config.method == "full":
        if config.lora.modules_to_save:
            raise LoraforgeError("lora.modules_to_save only applies to adapter methods; method: full trains everything")
        return model
    import peft

    if config.method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config(model, config, total_steps))


def trainable_summary(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
