"""`lorakit merge`: fold a LoRA adapter into a copy of its base and prove the result answers the same.

The merge itself runs in fp32 (peft's merge_and_unload) and only the saved copy is cast to the target
dtype: merging in 16 bits would round W + BA twice. A QLoRA adapter was trained against the 4-bit
base, so it is merged into those same 4-bit weights dequantized, never into (or back to) 4-bit weights.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit import adapter, card, files, model, parity, render
from lorakit.errors import LorakitError
from lorakit.run_folder import adapter_source

# The second check of a QLoRA merge compares with the 4-bit model the adapter was trained on, whose
# bitsandbytes kernels compute in 16 bits: even an exact merge differs from it by ~3% of the logit scale
# (SmolLM2: 1.09 of 39.8). Merging into the original fp32 weights instead would miss by far more (NF4
# moves SmolLM2's logits by up to 26), so this still catches a merge into the wrong weights.
QLORA_TOLERANCE = 0.05


def merge(
    adapter_path: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    qlora: bool | None = None,
    device: str = "auto",
    replace: bool = False,
) -> dict[str, Any]:
    """Merge, check logit parity on the saved files, then move them to `out` (atomically).

    dtype: of the saved weights, "auto" = `default_dtype(base)`. qlora: None = from the run config.
    device: where the merge and the parity check run ("auto": the GPU when there is one).
    replace: an existing `out` is replaced once the new merge passes (export --overwrite: its own merged/).
    Returns the parity report (max_abs_logit_diff, tolerance, ...; under "vs_4bit" for QLoRA).
    """
    device = model.pick_device(device)
    out = Path(out)
    if out.exists() and not replace:
        raise LorakitError(
            f"output folder {out} exists; remove it ({shlex.join(['rm', '-r', str(out)])}) or choose another OUT"
        )
    found = adapter_source(adapter_path)
    adir, run_cfg = found.path, found.run_config()
    meta = adapter.read_adapter(adir)
    if meta.peft_type != "LORA":
        raise LorakitError(f"{adir} is a {meta.peft_type} adapter; lorakit merges LoRA adapters only")
    base = adapter.base_of(found, base)
    adapter.check_base(meta, base, force=force, where=adir)
    qlora = (run_cfg is not None and run_cfg.method == "qlora") if qlora is None else qlora
    dtype = default_dtype(base) if dtype == "auto" else dtype
    if dtype not in model.DTYPES:
        raise LorakitError(f"--dtype {dtype}: use one of auto, {', '.join(model.DTYPES)}")
    tokenizer = model.adapter_tokenizer(adir, base)
    prompts, prompts_from = parity.prompts(run_cfg)
    rows = parity.inputs(tokenizer, prompts)
    quantized_reference = None
    if qlora:
        # What the adapter was trained with: the 4-bit base + adapter, bitsandbytes kernels and all, computing
        # in the dtype training used on this device.
        compute = model.pick_dtype(run_cfg.train.precision if run_cfg else "auto", device)
        trained_as = adapter.load(model.load_model(base, dtype=compute, device=device, quantization="4bit"), adir)
        quantized_reference = parity.logits(trained_as.eval(), rows)
        del trained_as
        base_model = dequantized_4bit(base, device)
    else:
        base_model = model.load_model(base, dtype=torch.float32, device=device)
    net = adapter.load(base_model, adir).eval()
    reference = parity.logits(net, rows)  # unmerged W x + B A x: what the merged W' = W + BA must reproduce
    merged = net.merge_and_unload().to(model.DTYPES[dtype])
    set_stop_tokens(merged, tokenizer)
    # Check parity on the saved files before they become OUT: a merge that fails it is never shipped.
    with files.atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # transformers 5 saves tokenizer.json only; llama.cpp's converter reads Gemma/Llama-2 vocabularies
        # from the sentencepiece file, so the base's travels with the merge.
        spm = model.base_file(base, "tokenizer.model")
        if spm is not None and not (tmp / "tokenizer.model").exists():
            shutil.copy2(spm, tmp / "tokenizer.model")
        card.write(tmp, "merged", base, found.run, shown_as=out.name)
        report = check_saved(tmp, rows, reference, quantized_reference, dtype, device)
    return {**report, "prompts": prompts_from, "qlora": qlora, "eos_token_id": merged.generation_config.eos_token_id}


def default_dtype(base: str) -> str:
    """The base's own dtype when it is 16-bit, else bf16.

    16 bits halve the folder (fp32 is opt-in, for exact parity). Keeping a 16-bit base's own kind
    matters: fp16 -> bf16 drops 3 mantissa bits, and bf16 -> fp16 can overflow (fp16 ends at 65504).
    An fp32 base (our alias is an fp32 copy dequantized from GGUF) gets bf16, which has fp32's
    range, so nothing overflows; it is also what hub checkpoints and GPUs use.
    """
    where = model.resolve(base)
    saved = None
    if where.kind in ("alias", "folder"):
        cfg = json.loads((Path(where.path) / "config.json").read_text())
        saved = cfg.get("dtype") or cfg.get("torch_dtype")
    elif where.kind == "hub":
        try:
            from transformers import AutoConfig

            saved = str(AutoConfig.from_pretrained(where.path).dtype or "")
        except OSError:
            saved = None
    return "fp16" if saved and "float16" in saved and "bfloat16" not in saved else "bf16"


def dequantized_4bit(base: str, device: str = "cpu") -> Any:
    """The base as the 4-bit QLoRA model saw it (NF4 round trip), as plain fp32 weights on `device`."""
    quantized = model.load_model(base, device=device, quantization="4bit")
    # A fresh load, dequantized before any forward pass: on CPUs with AVX512-BF16, bitsandbytes 0.50
    # repacks 4-bit weights into a CPU layout at the first forward, and dequantizing after that
    # returns wrong weights (measured: errors larger than the weights).
    quantized.dequantize()
    return quantized.to(torch.float32)


def set_stop_tokens(merged: Any, tokenizer: Any) -> None:
    """The merged model must stop where the adapter did: its EOS ids become `render.stop_ids` (end of turn first)."""
    gen = merged.generation_config
    ids = render.stop_ids(tokenizer, gen)
    gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def check_saved(
    folder: Path,
    rows: list[torch.Tensor],
    reference: torch.Tensor,
    quantized_reference: torch.Tensor | None,
    dtype: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """Reload the saved folder like a user would and compare its logits with base+adapter (and 4-bit+adapter)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": device})
    got = parity.logits(saved.eval(), rows)
    report = {**parity.compare(got, reference, parity.TOLERANCE[dtype]), "dtype": dtype}
    checks = [("base+adapter", report)]
    if quantized_reference is not None:
        report["vs_4bit"] = parity.compare(got, quantized_reference, max(parity.TOLERANCE[dtype], QLORA_TOLERANCE))
        checks.append(("the 4-bit base+adapter it was trained as", report["vs_4bit"]))
    for what, r in checks:
        parity.require(
            r, f"merge parity FAILED against {what} (saved as {dtype})", "Nothing was written; try --dtype fp32."
        )
    return report
