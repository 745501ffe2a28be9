"""How the rows of a padding-free micro-batch attend: each row to itself, at the cost of its own length.

Training runs a micro-batch as one sequence: its rows back to back, position ids restarting at each
(packing.collate with flat=True), so the embeddings, linear layers, norms and head work on real tokens only.
Padding each micro-batch to its longest row instead cost ~45% of the linear layers' work on the Llama-2 QLoRA
recipe's data. Attention must then stay inside each row, at the cost of the rows' own lengths: transformers' sdpa
and eager paths read restarting positions as a block-diagonal mask over the whole sequence, (1, 1, T, T) for T
tokens, whose work and memory grow with the square of the micro-batch (8 rows of 512: 8x the attention of padded
rows; TRL's padding_free on sdpa is that). `choose` is the one place that decides how, by what the device has:

  flash_attention_2  CUDA, 16-bit, flash-attn installed: its varlen kernel reads the restarting positions
                     (transformers' own path, which wants the one-row micro-batch it gets here)
  sdpa-per-row       otherwise, for a model on sdpa: sdpa on each row's slice of q, k and v, causal, with the
                     model's sliding window where a row is longer than it
  eager-per-row      the same through the model's own eager attention (Gemma 2's logit soft-cap)
  the model's own    where none applies (ALiBi models such as Bloom cannot read packed rows; a model whose
                     attention does not go through transformers' AttentionInterface; chunked attention): rows
                     are padded to the longest of their micro-batch, with a dense (B, 1, L, L) mask that
                     `lorakit plan` counts

The per-row attentions also read branches (`rows`): a row whose positions start at p > 0 continues the first p
tokens of the row before it that starts at 0, reading their keys and values as its own prefix (a bool or additive
mask over the prefix and itself, causal). A preference pair's rejected answer runs so after its chosen one, and the
prompt they share runs once (preference_train.branch); each answer still gets exactly its whole sequence's
log-probs, as tests/unit/test_sequence_logps.py checks against separate forwards.

Measured (bench/padding_free.py) on a 2-core CPU: per row against a padded micro-batch, the dense block mask,
and rows re-padded inside the attention; see the README. Not measured on a GPU yet: flash-attn where installed
is transformers' own packed path; per row elsewhere.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

FLASH = "flash_attention_2"
PER_ROW = {"sdpa-per-row": "sdpa", "eager-per-row": "eager"}  # name -> the attention it runs on each row


def choose(model: Any, device: str | torch.device, dtype: torch.dtype) -> str:
    """The attention a training run of `model` on `device` in `dtype` uses, by the name summary.json records."""
    base = _base(model)
    own = base.config._attn_implementation
    if not supports(type(base), base.config.get_text_config().to_dict()):
        return own
    if torch.device(device).type == "cuda" and dtype != torch.float32 and _flash_installed(base):
        return FLASH
    return f"{own}-per-row" if own in PER_ROW.values() else own


def use(model: Any, device: str | torch.device, dtype: torch.dtype) -> str:
    """Set `choose`'s attention on `model` (a transformers model); returns its name. The per-row attentions hand a
    padding mask or a KV cache to the model's own attention, so padded batches and generation work as before."""
    chosen, base = choose(model, device, dtype), _base(model)
    if chosen != base.config._attn_implementation:
        base.set_attn_implementation(chosen)
    return chosen


def name(model: Any) -> str:
    """The attention `model` runs now."""
    return _base(model).config._attn_implementation


def padding_free(attention: str) -> bool:
    """Whether the attention named keeps the rows of a one-row micro-batch apart at their own cost: then each
    micro-batch trains as one padding-free row; otherwise as rows padded to the longest."""
    return attention in PER_ROW or attention == FLASH


def shares_prefix(attention: str) -> bool:
    """Whether the attention named reads branches (`rows`): a preference pair's rejected answer then runs after
    its chosen one without the prompt they share, which runs once. flash-attn's varlen kernel would read a branch
    as a row of its own: there the pair's two sequences are whole."""
    return attention in PER_ROW


def reads_packed_rows(model: Any) -> bool:
    """Whether the model keeps packed examples apart given restarting position_ids (not ALiBi models)."""
    return "position_ids" in inspect.signature(_base(model).forward).parameters


def supports(cls: type, config: dict[str, Any]) -> bool:
    """Whether a model class (with its text config as a dict) can attend row by row: it reads packed rows from
    restarting position ids, its attention goes through transformers' AttentionInterface (whose functions get
    each call's position ids), and its layers' masks are causal, with a sliding window at most."""
    if "position_ids" not in inspect.signature(cls.forward).parameters or not cls._can_set_attn_implementation():
        return False
    if config.get("attention_chunk_size") or not hasattr(sys.modules[cls.__module__], "eager_attention_forward"):
        return False
    return set(config.get("layer_types") or ["full_attention"]) <= {"full_attention", "sliding_attention"}


def supports_config(config: dict[str, Any]) -> bool:
    """`supports` for a config.json alone (`lorakit plan`): its causal-LM class is looked up, not loaded."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    try:
        cls = getattr(transformers, name) if name else None
    except (ImportError, AttributeError):  # a class this transformers cannot import (a missing extra)
        cls = None
    return cls is not None and supports(cls, config.get("text_config") or config)


def _flash_installed(base: Any) -> bool:
    from transformers.utils import is_flash_attn_2_available  # flash-attn importable, on a CUDA build

    return bool(getattr(base, "_supports_flash_attn", False)) and is_flash_attn_2_available()


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rows(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[tuple[int, int, int, int]]]:
    """Each batch row's rows as (start, end, root, shared): a row starts wherever a position does not follow the one
    before it (transformers' own rule for packed sequences, find_packed_sequence_indices). A row whose first
    position p is above 0 is a branch (packing.collate's `start`) of the last row before it that starts at 0, its
    root, at most as long: it reads the root's first p tokens (from `root`, `shared` = p) as its own prefix. Else
    `shared` is 0 and the row reads itself alone."""
    if position_ids is None:
        return [[(0, length, 0, 0)]] * batch
    pos = position_ids.expand(batch, -1).cpu()  # one device sync per layer call
    breaks = pos[:, 1:] != pos[:, :-1] + 1
    out = []
    for b in range(batch):
        edges = [0, *(torch.nonzero(breaks[b]).flatten() + 1).tolist(), length]
        spans, root = [], None
        for s, e in itertools.pairwise(edges):
            first = int(pos[b, s])
            if first == 0:
                root = (s, e)
            branch = first > 0 and root is not None and first <= root[1] - root[0]
            spans.append((s, e, root[0], first) if branch else (s, e, s, 0))
        out.append(spans)
    return out


def _row_mask(inner: str, n: int, shared: int, window: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """The mask of one row's n queries over its keys (a branch's `shared` prefix, then its own): None where sdpa's
    own causal flag does (no prefix, no window reaching into the row); else causal and within the window, as a bool
    mask (sdpa) or an additive one (eager)."""
    if inner == "sdpa" and not shared and (not window or n <= window):
        return None
    keys = torch.arange(shared + n, device=like.device)
    back = keys[shared:, None] - keys[None, :]  # how far back the key is from the query
    keep = (back >= 0) & (back < window) if window else back >= 0  # transformers' window: kv > q - window
    if inner == "sdpa":
        return keep[None, None]
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(keep, zero, torch.finfo(like.dtype).min)[None, None]


def _own(inner: str, module: Any):
    # The model's eager attention is its own module's function (Gemma 2's applies the soft-cap); supports()
    # checked that there is one.
    return sdpa_attention_forward if inner == "sdpa" else sys.modules[type(module).__module__].eager_attention_forward


def _per_row(inner: str):
    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        """query (B, heads, T, head_dim), key and value (B, kv heads, T, head_dim) -> (B, T, heads, head_dim)."""
        own = _own(inner, module)
        length = query.shape[2]
        position_ids = kwargs.get("position_ids")
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
        # A padding mask, a KV cache (keys longer than queries), one query, a non-causal layer, 3D positions: the
        # model's own attention, with the mask it built.
        plain = position_ids is None or position_ids.dim() == 2
        if attention_mask is not None or key.shape[2] != length or length == 1 or not causal or not plain:
            return own(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window")
        out = []
        for b, spans in enumerate(rows(position_ids, query.shape[0], length)):
            parts = []
            for s, e, r, shared in spans:
                q, k, v = (x[b : b + 1, :, s:e] for x in (query, key, value))
                if shared:  # a branch: its root's first tokens, then its own
                    k, v = (torch.cat([x[b : b + 1, :, r : r + shared], y], dim=2) for x, y in ((key, k), (value, v)))
                parts.append(own(module, q, k, v, _row_mask(inner, e - s, shared, window, query), **kwargs)[0])
            out.append(torch.cat(parts, dim=1))
        return torch.cat(out, dim=0), None

    return attend


def _mask(inner: str):
    build = sdpa_mask if inner == "sdpa" else eager_mask

    def mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
             attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:  # fmt: skip
        # No padding and no cache: the attention keeps each row causal itself, reading the rows from their
        # positions, so no (B, 1, T, T) mask is built. Else the model's own mask.
        if attention_mask is None and q_length == kv_length and _zero(q_offset) and _zero(kv_offset):
            return None
        return build(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)

    return mask


def _zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


for _name, _inner in PER_ROW.items():
    AttentionInterface.register(_name, _per_row(_inner))
    AttentionMaskInterface.register(_name, _mask(_inner))
