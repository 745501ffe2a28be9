"""lorakit: fine-tune open LLMs with LoRA, QLoRA or full fine-tuning, then evaluate, merge and serve."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns on every import on CPUs with AVX512-BF16 that it could not fetch an optional
# kernel from the hub (which we never want at run time); it falls back to its own code path.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
