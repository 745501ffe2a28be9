"""`lorakit merge`: fold a LoRA adapter into a copy of its base and prove the result answers the same.

The merge itself runs in fp32 (peft's merge_and_unload) and only the saved copy is cast to the target
dtype: merging in 16 bits would round W + BA twice. A QLoRA adapter was trained against the 4-bit
base, so it is merged into those same 4-bit weights dequantized, never re-quantized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorakit import checkpoint, config, model
from lorakit.errors import LorakitError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |logit difference| accepted between base+adapter and the merged model, relative to the largest
# |logit|, per saved dtype: fp32 only reorders sums; 16-bit weights carry a relative rounding error of
# 2^-8 (bf16) or 2^-11 (fp16) per weight, which adds up over layers to about 1% of the logit scale.
TOLERANCE = {"fp32": 1e-4, "fp16": 0.01, "bf16": 0.03}
# A QLoRA reference runs bitsandbytes' 4-bit kernels, which compute in 16 bits: even an fp32 merge
# differs from it by ~3% of the logit scale (measured on SmolLM2: 1.09 of 39.8).
QLORA_TOLERANCE = 0.05
PARITY_PROMPTS = [
    [{"role": "user", "content": "How many employees work in Lisbon?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 times 3?"}],
]


def source(adapter_path: str | Path) -> tuple[Path, Any]:
    """The adapter folder and, when it comes from `lorakit train`, its run config (else None)."""
    from lorakit.adapter import adapter_dir

    adir = adapter_dir(adapter_path)
    run_config = adir.parent / "config.yaml"
    return adir, (config.load(run_config) if run_config.is_file() else None)


def merge(adapter_path: str | Path, out: str | Path, base: str | None = None, dtype: str = "bf16",
          force: bool = False, qlora: bool | None = None) -> dict[str, Any]:
    """Merge, save an HF model folder (atomically) and check logit parity; returns the parity report."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = Path(out)
    if out.exists():
        raise LorakitError(f"output folder {out} exists; remove it or choose another OUT")
    adir, run_cfg = source(adapter_path)
    meta = json.loads((adir / "adapter_config.json").read_text())
    base = base or (run_cfg.model if run_cfg else meta.get("base_model_name_or_path"))
    if not base:
        raise LorakitError(f"{adir}: the adapter does not name its base model; pass --base MODEL")
    check_base(meta, base, force, adir)
    qlora = (run_cfg is not None and run_cfg.method == "qlora") if qlora is None else qlora
    tokenizer = AutoTokenizer.from_pretrained(adir) if (adir / "tokenizer_config.json").is_file() \
        else model.load_tokenizer(base)
    if qlora:
        # The reference is what the adapter was trained with: 4-bit base + adapter.
        reference_net = PeftModel.from_pretrained(model.load_model(base, quantization="4bit"), adir).eval()
        ids = parity_inputs(tokenizer)
        reference = logits(reference_net, ids)
        del reference_net
        # A fresh 4-bit load, dequantized before any forward pass: on CPUs with AVX512-BF16,
        # bitsandbytes 0.50 repacks 4-bit weights into a CPU layout at the first forward, and
        # dequantizing after that returns wrong weights (measured: errors larger than the weights).
        quantized = model.load_model(base, quantization="4bit")
        quantized.dequantize()  # the exact weights the adapter saw, as plain tensors
        net = PeftModel.from_pretrained(quantized.to(torch.float32), adir).eval()
    else:
        net = PeftModel.from_pretrained(model.load_model(base, dtype=torch.float32), adir).eval()
        ids = parity_inputs(tokenizer)
        reference = logits(net, ids)
    merged = net.merge_and_unload().to(DTYPES[dtype])
    set_stop_tokens(merged, tokenizer)
    # Check parity on the saved files before they become OUT: a merge that fails it is never shipped.
    with checkpoint.atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report = parity(tmp, ids, reference, dtype, max(TOLERANCE[dtype], QLORA_TOLERANCE) if qlora else None)
    return report


def check_base(meta: dict, base: str, force: bool, adir: Path) -> None:
    """Refuse an adapter trained on another base (its weights would be meaningless on this one)."""
    declared = meta.get("base_model_name_or_path")
    if not declared or force:
        return
    same = {base, model.resolve(base).path} if _resolvable(base) else {base}
    if declared not in same and Path(declared).resolve() not in {Path(s).resolve() for s in same if Path(s).exists()}:
        raise LorakitError(f"{adir} was trained on '{declared}', not on '{base}'. Pass the matching --base, "
                           "or --force if they are the same weights under another name.")


def _resolvable(name: str) -> bool:
    try:
        model.resolve(name)
        return True
    except LorakitError:
        return False


def set_stop_tokens(merged: Any, tokenizer: Any) -> None:
    """The merged model must stop where the adapter did: EOS ids = the tokenizer's EOS + the base's."""
    gen = merged.generation_config
    ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    ids = [i for i in [tokenizer.eos_token_id, *ids] if i is not None]
    gen.eos_token_id = list(dict.fromkeys(ids)) if len(set(ids)) > 1 else ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]


def parity_inputs(tokenizer: Any) -> torch.Tensor:
    """A few fixed chats rendered with the adapter's template, truncated to a common length."""
    rows = [tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for c in PARITY_PROMPTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def logits(net: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(input_ids=ids).logits.float()


def parity(folder: Path, ids: torch.Tensor, reference: torch.Tensor, dtype: str,
           relative: float | None = None) -> dict[str, Any]:
    """Reload the saved folder like a user would and compare its logits with base+adapter."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got = logits(reloaded, ids)
    diff = (got - reference).abs().max().item()
    scale = reference.abs().max().item()
    relative = relative or TOLERANCE[dtype]
    tol = relative * max(scale, 1.0)
    top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    report = {"max_abs_logit_diff": diff, "tolerance": tol, "relative_tolerance": relative,
              "logit_scale": scale, "top1_agreement": top1, "dtype": dtype, "positions": int(ids.numel()),
              "ok": diff <= tol}
    if not report["ok"]:
        raise LorakitError(f"merge parity FAILED: max |logit diff| {diff:.4g} > tolerance {tol:.4g} "
                           f"({relative} × max |logit| {scale:.3g}, {dtype}); top-1 agreement {top1:.1%}. "
                           "Nothing was written; try --dtype fp32.")
    return report
