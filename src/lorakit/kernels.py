"""Fused GPU kernels for training (`train.kernels`): Liger-Kernel's, patched onto a loaded model before its adapter
is attached, for every architecture the installed liger-kernel has them for (llama, mistral, mixtral, qwen2/3, phi3,
gemma 1-3, smollm3...). Which kernels (RMSNorm, RoPE, the gated MLP: SwiGLU, or GeGLU for Gemma) is liger's own
default for that architecture.

lorakit computes its loss itself, running the head in chunks on the trained positions only (loss.py), so liger's
cross-entropy and fused linear cross-entropy stay off.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lorakit.errors import LorakitError

INSTALL = "pip install 'lorakit[gpu]'"
LOSSES = ("cross_entropy", "fused_linear_cross_entropy")  # liger's switches for the loss: always off
_APPLIED = "_lorakit_kernels"  # the attribute `apply` leaves on the model: what `applied` reports
Liger = Mapping[str, Callable[..., None]] | str  # liger's apply function per model_type, or why there is none


def installed_liger(on_cuda: bool) -> Liger:
    """What liger-kernel offers here: its `apply_liger_kernel_to_*` function per model_type, as the installed version
    maps them (liger's MODEL_TYPE_TO_APPLY_LIGER_FN), or a sentence saying why there is none. Not imported off CUDA,
    where none of it can run ({}: `choose` says why)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return f"liger-kernel is not installed: {INSTALL}"
    if not on_cuda:
        return {}
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as e:  # noqa: BLE001 - any failure (triton missing or built for another torch) is a message
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return (f"liger-kernel is installed but does not import ({type(e).__name__}: {first}); reinstall it with the "
                f"triton of this torch: {INSTALL} --force-reinstall")  # fmt: skip
    return dict(MODEL_TYPE_TO_APPLY_LIGER_FN)


def switches(patch: Callable[..., None]) -> list[str]:
    """The kernels liger's `patch` applies by default (its switches that default to True), its loss left out, sorted:
    e.g. ["rms_norm", "rope", "swiglu"]."""
    params = inspect.signature(patch).parameters.values()
    return sorted(p.name for p in params if p.default is True and p.name not in LOSSES)


def choose(kernels: str, model_type: str | None, on_cuda: bool, liger: Liger) -> tuple[list[str], str | None]:
    """The kernels `kernels` (auto, liger, none) asks for on this model and device, and why none where there are none:
    ([], None) for none, e.g. (["rms_norm", "rope", "swiglu"], None), or ([], why). 'liger' where they cannot run is a
    LorakitError saying why."""
    if kernels == "none":
        return [], None
    if isinstance(liger, str):
        why = liger
    elif not on_cuda:
        why = "its kernels run on CUDA GPUs only (Triton), and this run trains on the CPU"
    elif model_type not in liger or not switches(liger[model_type]):
        why = (f"the installed liger-kernel has no kernels for {model_type!r} models (it has them for: "
               f"{', '.join(sorted(m for m in liger if switches(liger[m])))}); a newer one may: pip install -U "
               "liger-kernel")  # fmt: skip
    else:
        return switches(liger[model_type]), None
    if kernels == "liger":
        raise LorakitError(f"train.kernels: liger cannot apply here: {why}. Use train.kernels: auto (applies "
                           "them where they can run) or none")  # fmt: skip
    return [], why


def apply(model: Any, kernels: str, device: str | torch.device) -> list[str]:
    """Patch liger's kernels into `model` (a transformers model, before peft wraps it) as `kernels` asks; returns
    the kernels applied (also `applied(model)`). On CUDA, `auto` that applies none says so in one line, and why.

    liger patches this instance's modules, and also replaces the norm and MLP classes and the RoPE function of
    the architecture's transformers module for the whole process: every model of that model_type built in this
    process afterwards (an evaluation's, a merge's) gets liger's CUDA-only modules too.
    """
    model_type = getattr(model.config, "model_type", None)
    on_cuda = torch.device(device).type == "cuda"
    liger = installed_liger(on_cuda) if kernels != "none" else {}
    chosen, why = choose(kernels, model_type, on_cuda, liger)
    if chosen:
        patch = liger[model_type]
        accepted = inspect.signature(patch).parameters
        # The loss stays lorakit's (loss.py): liger's cross-entropy and fused linear cross-entropy stay off.
        patch(model=model, **dict.fromkeys(chosen, True), **{k: False for k in LOSSES if k in accepted})
    elif why and on_cuda and os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine under a launch
        print(f"note: train.kernels: auto applies no fused kernels: {why}")
    setattr(model, _APPLIED, chosen)
    return chosen


def applied(model: Any) -> list[str]:
    """The kernels `apply` patched into `model` (or the base of a PeftModel around it); [] for none."""
    return list(getattr(model, _APPLIED, []))
