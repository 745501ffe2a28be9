"""Causal-LM loss over trained tokens only, computing logits only where a label is trained.

The LM head is a large share of a small model's compute (SmolLM2-135M: 49k vocab × 576 hidden is ~20%
of the forward FLOPs) and its (tokens × vocab) logits dominate activation memory. With completion-only
training most positions have no target, so the head runs on the trained positions alone, and in chunks
whose gradient is taken at once (`LinearCrossEntropy`): the whole (tokens × vocab) logits, their
log-softmax and its gradient (three fp32 copies, 1 GB for 2k tokens of a 49k vocabulary) never exist.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import attention, packing
from lorakit.model import evaluating
from lorakit.render import IGNORE

# Configs whose models post-process logits in ways the direct path below would skip.
_UNSUPPORTED_DIRECT = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained targets and their count.

    batch: input_ids, labels (B, L) and position_ids or attention_mask (B, L). Labels are unshifted
    (HF convention): position t is scored on predicting labels[t + 1]. Summing here and dividing by
    the token count of the whole accumulated step makes grad-accum exact (see train.py).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    direct = _decoder_and_head(model)
    if direct is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
    else:
        decoder, head, softcap = direct
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, H)
        if count and _fusable(head):
            return linear_cross_entropy(hidden, head.weight, targets[keep], softcap), count
        logits = head(hidden)
        if softcap:  # Gemma 2 caps logits with tanh; skipping it would change the loss
            logits = torch.tanh(logits / softcap) * softcap
    if count == 0:
        return logits.sum() * 0.0, 0  # keeps the graph connected so every rank still syncs
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), count


CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk: large enough for full-speed matmuls, small beside the model


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` (optionally tanh-capped) against `targets`, chunk by chunk.

    With gradients on, each chunk's gradient with respect to hidden (and weight, where it trains) is taken in
    the forward, while its logits are at hand; backward only scales them. The same FLOPs as head + loss +
    their backward, without keeping any logits: memory is one chunk's logits plus a (tokens × hidden) grad.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, softcap)
    return _chunks(hidden, weight, targets, softcap, None, None)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        # Under fp16 the gradient is kept in fp32 until backward scales it (by the loss scale / trained tokens,
        # which may pass fp16's 65,504); a 16-bit copy would also round off what the loss scaler is there to keep.
        kept = torch.float32 if _runs_in_fp16(hidden, weight) else hidden.dtype
        grad_hidden = torch.empty_like(hidden, dtype=kept) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = _chunks(hidden, weight, targets, softcap, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else (grad_hidden * grad_total).to(ctx.hidden_dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
            None,
            None,
        )


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    per_token: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss sum; fills grad_hidden / grad_weight (d loss / d input) where given, and per_token (N,) with each
    token's loss where given. scale (N,): each token's weight in the gradients (their sum's gradient is unscaled)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    fp16 = _runs_in_fp16(hidden, weight)
    # For d loss / d hidden, once, not per chunk: the weight in the dtype its matmul runs in, and under fp16 a bound on
    # that matmul's entries (a row of softmax - one-hot sums to at most 2 in absolute value).
    back = None if grad_hidden is None else weight.to(torch.float16 if fp16 else hidden.dtype)
    back_bound = 2 * _largest(back) if fp16 and back is not None else None
    for i in range(0, hidden.shape[0], rows):
        h, t = hidden[i : i + rows], targets[i : i + rows]
        logits = (h @ weight.t()).float()  # under autocast the matmul runs in 16 bits, the softmax in fp32
        if softcap:  # Gemma 2: logits = c * tanh(z / c)
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
        lse = torch.logsumexp(logits, dim=-1)
        token = lse - logits.gather(1, t[:, None]).squeeze(1)
        total += token.sum()
        if per_token is not None:
            per_token[i : i + rows] = token
        if grad_hidden is None and grad_weight is None:
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad[torch.arange(len(t), device=t.device), t] -= 1.0
        if softcap:
            grad *= 1.0 - capped * capped
        if scale is not None:
            grad *= scale[i : i + rows, None]
        if fp16:  # fp32 values through fp16 matmuls, scaled into fp16's range (_fp16_matmul)
            if back is not None:
                grad_hidden[i : i + rows] = _fp16_matmul(grad, back, back_bound)
            if grad_weight is not None:
                bound = torch.linalg.vector_norm(grad, 1, dim=0).amax() * _largest(h)
                grad_weight += _fp16_matmul(grad.t(), h, bound)
            continue
        grad = grad.to(h.dtype)
        if back is not None:
            grad_hidden[i : i + rows] = grad @ back
        if grad_weight is not None:
            grad_weight += (grad.t() @ h).float()
    return total


FP16_ROOM = 2.0**14  # where _fp16_matmul puts the largest entry of a product: 4x below fp16's largest value (65,504)


def _runs_in_fp16(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the head's matmuls run in fp16: under fp16 autocast (accelerate's, for train.precision fp16), or on
    fp16 tensors."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) == torch.float16
    return torch.promote_types(hidden.dtype, weight.dtype) == torch.float16


def _largest(x: torch.Tensor) -> torch.Tensor:
    """max |x| in fp32, as a tensor (no sync with the GPU), without an |x| copy of a weight-sized tensor."""
    low, high = x.aminmax()
    return torch.maximum(-low, high).float()


def _fp16_matmul(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """a @ b in fp16 with an fp32 result, for `a` in fp32 whose products' entries are at most `bound` in size.

    `a` (softmax - one-hot: entries of at most 1) is scaled by the power of two that brings the largest entry of the
    product near FP16_ROOM (at most 2^14): probabilities far below fp16's smallest (6e-8) keep their share, and no
    entry overflows; the result is scaled back in fp32. Powers of two scale exactly.
    """
    scale = torch.exp2(torch.floor(torch.log2(FP16_ROOM / bound.clamp(min=1e-30)))).clamp(max=FP16_ROOM)
    return ((a * scale).to(torch.float16) @ b.to(torch.float16)).float() / scale


def _fusable(head: Any) -> bool:
    """A plain bias-free linear head (not a LoRA-wrapped or 4-bit one): its weight is all the head does."""
    return type(head) is nn.Linear and head.bias is None


class OnTrainedTokens(nn.Module):
    """`model` with `loss_sum` as its forward. Training prepares this module, not the model, so that DDP and
    FSDP see the whole loss inside one forward: their gradient hooks are set up there, and the head that
    `loss_sum` runs on its own (on trained positions only) would otherwise be called outside them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch)


def eval_sums(
    net: Any,
    examples: list[dict],
    rows: list[list[int]],
    batch_size: int,
    pad_id: int,
    use_positions: bool,
    device: Any,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, int]:
    """Summed loss and trained-token count over held-out rows: no gradients, dropout off.

    rows: lists of indices into `examples` (packed rows, or one example per row). Training calls it on
    its rank's share of the eval rows and sums over ranks; `lorakit eval` calls it per model. Where the model's
    attention is padding-free (attention.use set it, as training does), each batch is one padding-free row.
    """
    flat = attention.padding_free(attention.name(net))
    total, count = 0.0, 0
    with evaluating(net), torch.no_grad():
        for j in range(0, len(rows), batch_size):
            batch = packing.collate(
                [[examples[i] for i in r] for r in rows[j : j + batch_size]], pad_id, use_positions, flat
            )
            with autocast():
                s, n = loss_sum(net, {k: v.to(device) for k, v in batch.items()})
            total, count = total + s.item(), count + n
    return total, count


def _decoder_and_head(model: Any) -> tuple[Any, Any, float | None] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, k, None) not in (None, 1, 1.0) for k in _UNSUPPORTED_DIRECT):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head, getattr(text_config, "final_logit_softcapping", None)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its trained tokens, and their count (preference objectives).

    batch: input_ids, labels (B, L), position_ids or attention_mask (B, L), as packing.collate builds it, and
    segments (B, L): which sequence (0 .. S-1) each position belongs to (-1: padding). Returns logps (S,) fp32,
    gradient-carrying, and counts (S,). Like `loss_sum`, the head runs on trained positions only, in chunks, and no
    (tokens x vocab) logits tensor is kept: preference pairs share SFT's memory and FLOPs per token.
    """
    labels, segments = batch["labels"], batch["segments"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    which = segments[:, 1:][keep]  # the sequence of each trained target: position t predicts labels[t + 1]
    n = int(segments.max()) + 1
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "segments")}
    direct = _decoder_and_head(model)
    if direct is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
        losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    else:
        decoder, head, softcap = direct
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, H)
        if _fusable(head):
            losses = linear_token_losses(hidden, head.weight, targets[keep], softcap)
        else:
            logits = head(hidden)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    logps = torch.zeros(n, dtype=torch.float32, device=losses.device).index_add(0, which, -losses)
    counts = torch.zeros(n, dtype=torch.long, device=which.device).index_add_(0, which, torch.ones_like(which))
    return logps, counts


def linear_token_losses(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Each token's cross-entropy (N,) of `hidden @ weight.T` (optionally tanh-capped) against `targets`, chunk by
    chunk as `linear_cross_entropy`, for losses that weigh each token by its own sequence (a preference loss)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearTokenLosses.apply(hidden, weight, targets, softcap)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _chunks(hidden, weight, targets, softcap, None, None, out)
    return out


class LinearTokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None):
        device = hidden.device.type
        ctx.hidden_dtype, ctx.weight_dtype, ctx.softcap = hidden.dtype, weight.dtype, softcap
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        kept = torch.float32 if _runs_in_fp16(hidden, weight) else hidden.dtype
        # Each token's own gradient d loss_t / d hidden_t, taken while its logits are at hand: backward only scales
        # each row by its token's upstream gradient, as LinearCrossEntropy scales all rows by one.
        grad_hidden = torch.empty_like(hidden, dtype=kept) if hidden.requires_grad else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        _chunks(hidden, weight, targets, softcap, grad_hidden, None, out)
        # A trained head (full fine-tuning) sums each token's gradient weighted by the upstream gradient that only
        # backward knows: its chunks' logits are computed again there.
        ctx.save_for_backward(grad_hidden, hidden if weight.requires_grad else None, weight, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, hidden, weight, targets = ctx.saved_tensors
        grad_out = grad_out.float()
        gh = None if grad_hidden is None else (grad_hidden * grad_out[:, None]).to(ctx.hidden_dtype)
        gw = None
        if hidden is not None:
            device, enabled, dtype = ctx.autocast
            gw = torch.zeros_like(weight, dtype=torch.float32)
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                _chunks(hidden, weight, targets, ctx.softcap, None, gw, scale=grad_out)
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, None, None


class OnSequences(nn.Module):
    """`model` with `sequence_logps` as its forward: what a preference run prepares with accelerate, for the reason
    OnTrainedTokens gives (the head runs inside the forward that DDP and FSDP wrap)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch)
