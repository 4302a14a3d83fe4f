"""loraforge: from a base LLaMA-family model and your own data to a fine-tuned model."""

import warnings

__version__ = "0.1.0"

# peft still asks transformers 5 for `is_gradient_checkpointing`; the rename warning says
# nothing a user can act on, and it would print on every train and load
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
