"""Mixed-adapter batches in one batched LoRA computation per layer (Punica / S-LoRA style).

peft's per-row path (`adapter_names=`) runs, in every LoRA layer, one A/B pair per distinct adapter on that
adapter's rows: with K adapters in a batch a decode step makes K times as many small matmuls, and their
fixed cost dominates a step of a small model on a CPU. Here every layer keeps its adapters' A and B
stacked (zero-padded to the largest rank, so ranks may differ and the padding adds exact zeros); a step
gathers each row's pair and makes two batched matmuls for all rows, whatever the mix. Row b computes
base(x_b) + scaling_b · B_b (A_b x_b), as peft does; the base rows use an all-zero pair.

Used by the engine while a batch runs; `supported` tells where it cannot stand in for peft (DoRA,
embedding or Conv1D LoRA layers, modules_to_save), and the engine then keeps peft's per-row path.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

KEPT = 8  # stacks kept per layer (adapter sets seen recently); a new set of adapters builds new ones
_IDENT: dict[tuple, tuple] = {}  # (model, adapter names) -> (their weights, a number naming that state)
_STATES = itertools.count()  # never reused, unlike an id
_FOUND: dict[tuple, tuple[bool, list]] = {}  # (model, its adapters) -> (supported, LoRA layers): a step must not walk


def lora_layers(net: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def supported(net: Any) -> bool:
    """Whether every LoRA layer is a plain linear LoRA this module computes exactly like peft."""
    return _found(net)[0]


def _found(net: Any) -> tuple[bool, list]:
    # Adapters load and unload by name (a retrained one under a new name), so names identify the layers' state.
    key = (id(net), tuple(getattr(net, "peft_config", {})))
    if key not in _FOUND:
        if len(_FOUND) >= KEPT:
            _FOUND.clear()
        layers = lora_layers(net)
        _FOUND[key] = (_plain(net, layers), layers)
    return _FOUND[key]


def _plain(net: Any, layers: list) -> bool:
    from peft.utils import ModulesToSaveWrapper

    if any(isinstance(m, ModulesToSaveWrapper) for m in net.modules()):
        return False
    for layer in layers:
        if getattr(layer, "fan_in_fan_out", False) or any(layer.use_dora.values()):
            return False
        if any(getattr(layer, "lora_bias", {}).values()):
            return False
        if layer.lora_embedding_A or not all(isinstance(a, nn.Linear) for a in layer.lora_A.values()):
            return False
    return True


@contextlib.contextmanager
def rows(net: Any, adapters: list[str | None]) -> Iterator[None]:
    """Within the block, row b of every forward through `net` uses adapter `adapters[b]` (None: the base)."""
    names = tuple(sorted({a for a in adapters if a is not None}))
    index = tuple(names.index(a) + 1 if a is not None else 0 for a in adapters)
    layers = _found(net)[1]
    # Which weights these names stand for: one A weight per adapter, held (so no new tensor can take its
    # id). A reloaded adapter brings new tensors, and every layer's stacks are built anew.
    ident = tuple(next((lay.lora_A[n].weight for lay in layers if n in lay.lora_A), None) for n in names)
    held = _IDENT.get((id(net), names))
    if held is None or len(held[0]) != len(ident) or any(x is not y for x, y in zip(held[0], ident)):
        if len(_IDENT) >= KEPT:
            _IDENT.clear()
        held = _IDENT[id(net), names] = (ident, next(_STATES))
    key = (names, index, held[1])
    for layer in layers:
        cache = layer.__dict__.setdefault("_lorakit_stacks", {})
        if key not in cache:
            if len(cache) >= KEPT:
                cache.clear()
            cache[key] = _forward(layer, *_stack(layer, names, index))
        layer.__dict__["forward"] = cache[key]  # not nn.Module's __setattr__: this runs every step
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # the class's own forward again


def _forward(layer: Any, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    base = layer.base_layer
    # A plain nn.Linear is called as the function it is: no module call machinery, 210 times a step.
    plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = F.linear(x, base.weight, base.bias) if plain else base(x, *args, **kwargs)
        rows, width = mask.shape[0], out.shape[-1]
        flat = x.to(a.dtype).reshape(-1, a.shape[0])  # (rows x positions, in)
        # Every row against every adapter's A at once (K x r columns: small), each row keeping its own
        # adapter's columns, then B: two plain GEMMs for any mix of adapters. The zeros add exact zeros.
        h = (flat @ a).reshape(rows, -1, a.shape[1]) * mask
        res = torch.addmm(out.reshape(-1, width), h.reshape(-1, a.shape[1]), b.to(out.dtype))
        return res.reshape(out.shape)

    return forward


def _stack(layer: Any, names: tuple[str, ...], index: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The adapters' A^T side by side (in, K r), their scaled B^T stacked (K r, out), and each row's mask
    (rows, 1, K r) of the columns of its own adapter: none for the base rows and for adapters that do not
    target this layer."""
    weight = layer.get_base_layer().weight
    present = [n for n in names if n in layer.lora_A]
    ref = layer.lora_A[present[0]].weight if present else weight
    a = (torch.cat([layer.lora_A[n].weight.T for n in present], dim=1)
         if present else ref.new_zeros(layer.in_features, 1))  # fmt: skip
    b = (torch.cat([(layer.lora_B[n].weight * layer.scaling[n]).T for n in present])  # the scaling folded into B
         if present else ref.new_zeros(1, layer.out_features))  # fmt: skip
    spans, start = {}, 0
    for n in present:
        spans[n] = (start, start + layer.lora_A[n].weight.shape[0])
        start = spans[n][1]
    mask = ref.new_zeros(len(index), 1, a.shape[1])
    for row, i in enumerate(index):
        if i and names[i - 1] in spans:
            lo, hi = spans[names[i - 1]]
            mask[row, 0, lo:hi] = 1
    return a.contiguous(), b.contiguous(), mask
