"""Fused GPU kernels for training (`train.kernels`): Liger-Kernel's RMSNorm, RoPE and gated MLP (SwiGLU; GeGLU
for Gemma) patched onto a loaded model before its adapter is attached.

lorakit computes its loss itself, running the head in chunks on the trained positions only (loss.py), so liger's
cross-entropy and fused linear cross-entropy stay off.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from lorakit.errors import LorakitError

INSTALL = "pip install 'lorakit[gpu]'"
# model_type -> liger's function for it and the name of its gated-MLP switch (Gemma's MLP is a GeGLU). Other
# architectures (bloom, gpt2...) train on transformers' own modules.
LIGER = {
    "llama": ("apply_liger_kernel_to_llama", "swiglu"),
    "mistral": ("apply_liger_kernel_to_mistral", "swiglu"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "swiglu"),
    "gemma": ("apply_liger_kernel_to_gemma", "geglu"),
    "gemma2": ("apply_liger_kernel_to_gemma2", "geglu"),
    "gemma3_text": ("apply_liger_kernel_to_gemma3_text", "geglu"),
    "gemma3": ("apply_liger_kernel_to_gemma3", "geglu"),  # the multimodal checkpoints (4B and up)
}
_APPLIED = "_lorakit_kernels"  # the attribute `apply` leaves on the model: what `applied` reports


def choose(kernels: str, model_type: str | None, on_cuda: bool, installed: bool) -> list[str]:
    """The kernels `kernels` (auto, liger, none) asks for on this model and device: [] or e.g.
    ["rms_norm", "rope", "swiglu"]. 'liger' where they cannot run is a LorakitError saying why."""
    if kernels == "none":
        return []
    if not installed:
        why = f"liger-kernel is not installed: {INSTALL}"
    elif not on_cuda:
        why = "its kernels run on CUDA GPUs only (Triton), and this run trains on the CPU"
    elif model_type not in LIGER:
        why = f"liger-kernel has no kernels lorakit uses for {model_type!r} models (only for: {', '.join(LIGER)})"
    else:
        return ["rms_norm", "rope", LIGER[model_type][1]]
    if kernels == "liger":
        raise LorakitError(f"train.kernels: liger cannot apply here: {why}. Use train.kernels: auto (applies "
                           "them where they can run) or none")  # fmt: skip
    return []


def apply(model: Any, kernels: str, device: str | torch.device) -> list[str]:
    """Patch liger's kernels into `model` (a transformers model, before peft wraps it) as `kernels` asks; returns
    the kernels applied (also `applied(model)`).

    liger patches the instance's norms and MLPs, and RoPE for the whole architecture: every model of that
    `model_type` this process runs afterwards uses its (CUDA-only) RoPE kernel.
    """
    model_type = getattr(model.config, "model_type", None)
    on_cuda = torch.device(device).type == "cuda"
    chosen = choose(kernels, model_type, on_cuda, importlib.util.find_spec("liger_kernel") is not None)
    if chosen:
        import liger_kernel.transformers as liger

        patch, mlp = LIGER[model_type]
        # The loss stays lorakit's (loss.py): liger's cross-entropy and fused linear cross-entropy stay off.
        getattr(liger, patch)(model=model, rope=True, rms_norm=True, cross_entropy=False,
                              fused_linear_cross_entropy=False, **{mlp: True})  # fmt: skip
    setattr(model, _APPLIED, chosen)
    return chosen


def applied(model: Any) -> list[str]:
    """The kernels `apply` patched into `model` (or the base of a PeftModel around it); [] for none."""
    return list(getattr(model, _APPLIED, []))
