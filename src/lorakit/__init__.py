"""lorakit: fine-tune open LLMs with LoRA, QLoRA or full fine-tuning, then evaluate, merge and serve."""

__version__ = "0.1.0"
