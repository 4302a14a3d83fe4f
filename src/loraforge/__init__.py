"""loraforge: from a base LLaMA-family model and your own data to a fine-tuned model."""

__version__ = "0.1.0"
