"""Do two models answer alike? fp32 logits on the same prompts, compared relative to the largest logit.

merge checks a merged model against base+adapter with it, export a GGUF against the model it came from.
"""

from __future__ import annotations

from typing import Any

import torch
from jinja2.exceptions import TemplateError

from lorakit import render
from lorakit.errors import LorakitError

# Max |logit difference| accepted between two models that should answer alike (base+adapter and its merge,
# a model and its GGUF), relative to the largest |logit|, per dtype of the copy: fp32 only reorders sums;
# 16-bit weights carry a relative rounding error of 2^-8 (bf16) or 2^-11 (fp16) per weight, which adds up
# over layers to about 1% of the logit scale.
TOLERANCE = {"fp32": 1e-4, "fp16": 0.01, "bf16": 0.03}
BUILT_IN = [
    [{"role": "user", "content": "How many employees work in Lisbon?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 times 3?"}],
]


def prompts(run_cfg: Any) -> tuple[list[list[dict]], str]:
    """Up to 3 prompts of the run's held-out file (the adapter's own task), plus 3 general ones."""
    from lorakit import formats, sources

    eval_path = run_cfg.data.eval if run_cfg is not None else None
    if not isinstance(eval_path, str):
        return BUILT_IN, "built-in"
    try:
        rows = sources.read(eval_path, limit=3)
        chats = formats.convert(
            rows.records,
            rows.where,
            run_cfg.data.format,
            run_cfg.data.template,
            run_cfg.data.system_prompt,
            keep_unanswered=True,
        ).examples
    except LorakitError:  # e.g. a relative path from another working directory: the built-in ones still test
        return BUILT_IN, "built-in"
    # Each chat's prompt (its turns before the answer): the answer position is where the adapter matters most.
    own = [prompt for prompt, _ in map(render.split, (c.get("messages") or [] for c in chats)) if prompt]
    return own + BUILT_IN, f"{len(own)} held-out from {eval_path} + built-in"


def inputs(tokenizer: Any, prompts: list[list[dict]], max_tokens: int = 512) -> list[torch.Tensor]:
    """Each chat rendered with the adapter's template, as a (1, seq <= max_tokens) id tensor (no padding).

    A long chat keeps its last tokens: the answer position is the one that matters, and both models
    see the same ids either way. Chats the template refuses (Gemma's has no system turn) are left out.
    """
    return [torch.tensor([ids[-max_tokens:]]) for _, ids in rendered(tokenizer, prompts)]


def rendered(tokenizer: Any, prompts: list[list[dict]]) -> list[tuple[list[dict], list[int]]]:
    """(chat, its prompt ids) for the chats the template renders (Gemma's raises on a system turn, by design)."""
    out = []
    for c in prompts:
        try:
            out.append((c, render.prompt_ids(tokenizer, c)))
        except (TemplateError, ValueError):
            continue
    return out


def logits(net: Any, rows: list[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of every position of every row, concatenated on the CPU: (total positions, vocab).

    Each row runs on the model's device, so two models on different devices compare directly.
    """
    device = next(net.parameters()).device
    with torch.no_grad():
        return torch.cat([net(input_ids=ids.to(device)).logits.float()[0].cpu() for ids in rows])


def compare(got: torch.Tensor, reference: torch.Tensor, relative: float) -> dict[str, Any]:
    """How far `got` is from `reference` (both (positions, vocab)), against `relative` x the largest |logit|."""
    diff = (got - reference).abs().max().item()
    scale = reference.abs().max().item()
    # Relative to the largest logit: logit scales differ by model (tiny random ones ~5, SmolLM2 ~40).
    tol = relative * max(scale, 1.0)
    top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {
        "max_abs_logit_diff": diff,
        "tolerance": tol,
        "relative_tolerance": relative,
        "logit_scale": scale,
        "top1_agreement": top1,
        "positions": int(reference.shape[0]),
        "ok": diff <= tol,
    }


def require(report: dict[str, Any], failed: str, advice: str) -> None:
    """Unless `report` (of `compare`) is ok, raise one message: what `failed`, by how much, and `advice`."""
    if not report["ok"]:
        raise LorakitError(
            f"{failed}: max |logit diff| {report['max_abs_logit_diff']:.4g} > tolerance {report['tolerance']:.4g} "
            f"({report['relative_tolerance']} x max |logit| {report['logit_scale']:.3g}); top-1 agreement "
            f"{report['top1_agreement']:.1%}. {advice}"
        )
