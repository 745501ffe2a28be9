"""Mixed-adapter batches in one batched LoRA computation per layer (Punica / S-LoRA style).

peft's per-row path (`adapter_names=`) runs, in every LoRA layer, one A/B pair per distinct adapter on that
adapter's rows: with K adapters in a batch a decode step makes K times as many small matmuls, and their
fixed cost dominates a step of a small model on a CPU. Here every layer keeps the loaded adapters' A^T and
scaled B^T stacked, zero-padded to the largest rank (padding adds exact zeros, so ranks may differ), with
slot 0 all zeros for the base rows. For a batch, each row's pair is gathered once (while the batch's rows
stay the same, decode steps reuse it) and a step is two batched matmuls per layer, whatever the mix:
row b computes base(x_b) + scaling_b · B_b (A_b x_b), as peft does.

Why gathered per row rather than every adapter's A for every row and a mask (the design before this one):
a row then multiplies only its own rank, not all K ranks. On a 2-core CPU a decode step of 8 rows over 8
adapters measured 98-113 ms per row-gathered step against 118-128 ms masked, the base model alone 87-103 ms.
The price is memory: the stacks hold every loaded adapter padded to the largest rank, and the gathered
copies rows x rank x (in + out) per layer, for the current row layout only: with SmolLM2-135M at rank 16,
about 20 MiB per adapter and per row (8 adapters of ranks 8 and 16, 8 rows: 168 + 149 MiB, beside the
adapters' own 112 MiB).

Used by the engine while a batch runs; `supported` tells where it cannot stand in for peft (DoRA,
embedding or Conv1D LoRA layers, modules_to_save), and the engine then keeps peft's per-row path.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

KEPT_ROWS = 1  # row layouts kept per layer: the engine's next new layout never returns (a prefill's new rows,
# then the running batch joined with them, then that batch less its finished rows)
_STATES = itertools.count()  # never reused, unlike an id
_KEPT_MODELS = 8


class _Found(NamedTuple):
    """What a step needs to know of a model, found once per state of its adapters (a step must not walk it)."""

    model: weakref.ref  # held weakly and compared: a freed model (peft unwrapped when its last adapter goes)
    # lets a new one take its id, maybe with the same adapter names
    names: tuple[str, ...]
    weights: tuple  # one A weight per adapter, held (so no new tensor takes its id): a reload brings new ones
    supported: bool
    layers: list
    state: int  # names this model's adapters as they are: the layers' stacks are built for one state


_FOUND: dict[int, _Found] = {}  # id(model) ->


def lora_layers(net: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def supported(net: Any) -> bool:
    """Whether every LoRA layer is a plain linear LoRA this module computes exactly like peft."""
    return _found(net).supported


def _found(net: Any) -> _Found:
    """The model's entry, found anew when it is another model or an adapter loaded, unloaded or reloaded
    under its name (which may bring DoRA, or new target modules)."""
    names = tuple(getattr(net, "peft_config", {}))
    found = _FOUND.get(id(net))
    if (found is not None and found.model() is net and found.names == names
            and all(x is y for x, y in zip(found.weights, _weights(found.layers, names)))):  # fmt: skip
        return found
    for gone in [k for k, v in _FOUND.items() if v.model() is None]:  # its layers' stacks are freed with it
        del _FOUND[gone]
    if len(_FOUND) >= _KEPT_MODELS:
        _FOUND.clear()
    layers = lora_layers(net)
    found = _FOUND[id(net)] = _Found(weakref.ref(net), names, _weights(layers, names), _plain(net, layers), layers,
                                     next(_STATES))  # fmt: skip
    return found


def _weights(layers: list, names: tuple[str, ...]) -> tuple:
    return tuple(next((lay.lora_A[n].weight for lay in layers if n in lay.lora_A), None) for n in names)


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
    found, layout = _found(net), tuple(adapters)
    state = found.state
    for layer in found.layers:
        stacks = layer.__dict__.get("_lorakit_stacks")
        if stacks is None or stacks["state"] != state:
            stacks = layer.__dict__["_lorakit_stacks"] = _stack(layer) | {"state": state, "rows": {}}
        forward = stacks["rows"].get(layout)
        if forward is None:
            if len(stacks["rows"]) >= KEPT_ROWS:
                stacks["rows"].clear()
            forward = stacks["rows"][layout] = _forward(layer, *_gather(stacks, layout))
        layer.__dict__["forward"] = forward  # not nn.Module's __setattr__: this runs every step
    try:
        yield
    finally:
        for layer in found.layers:
            layer.__dict__.pop("forward", None)  # the class's own forward again


def _stack(layer: Any) -> dict:
    """The layer's adapters' A^T (K+1, in, r_max) and scaled B^T (K+1, r_max, out), slot 0 the base's zeros."""
    names = list(layer.lora_A)
    ranks = {n: layer.lora_A[n].weight.shape[0] for n in names}
    if not names:  # peft keeps a layer whose adapters were all deleted: it runs the base alone
        return {"a": None, "b": None, "slot": {}, "rank": {}}
    ref = layer.lora_A[names[0]].weight  # dtype and device of the LoRA weights, not the base's (4-bit: uint8)
    a = ref.new_zeros(len(names) + 1, layer.in_features, max(ranks.values()))
    b = ref.new_zeros(len(names) + 1, max(ranks.values()), layer.out_features)
    for slot, n in enumerate(names, start=1):
        a[slot, :, : ranks[n]] = layer.lora_A[n].weight.T
        b[slot, : ranks[n]] = (layer.lora_B[n].weight * layer.scaling[n]).T  # the scaling folded into B
    return {"a": a, "b": b, "slot": {n: i for i, n in enumerate(names, start=1)}, "rank": ranks}


def _gather(stacks: dict, layout: tuple[str | None, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each row's A^T (rows, in, r) and B^T (rows, r, out), r the largest rank among the rows' adapters;
    (None, None) where no row's adapter adapts this layer."""
    slots = [stacks["slot"].get(n, 0) for n in layout]  # an adapter that skips this layer: the zeros
    used = [stacks["rank"][n] for n in layout if n in stacks["slot"]]
    if not used:
        return None, None
    r = max(used)
    index = torch.tensor(slots, device=stacks["a"].device)
    return stacks["a"][:, :, :r].index_select(0, index), stacks["b"][:, :r].index_select(0, index)


def _forward(layer: Any, a: torch.Tensor | None, b: torch.Tensor | None):
    base = layer.base_layer
    # A plain nn.Linear is called as the function it is: no module call machinery, 210 times a step.
    plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = F.linear(x, base.weight, base.bias) if plain else base(x, *args, **kwargs)
        if a is None:
            return out
        rows, width = a.shape[0], out.shape[-1]
        h = torch.bmm(x.to(a.dtype).reshape(rows, -1, a.shape[1]), a)  # (rows, positions, r)
        if out.dtype == b.dtype:
            return torch.baddbmm(out.reshape(rows, -1, width), h, b).reshape(out.shape)
        # LoRA weights kept in fp32 on a bf16 base (peft's default): its sum is cast, as peft's is.
        return (out.reshape(rows, -1, width) + torch.bmm(h, b).to(out.dtype)).reshape(out.shape)

    return forward
