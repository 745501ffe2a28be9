"""The reference log-probabilities of DPO and KTO, computed once with the starting weights and kept with the
tokenized data.

Peers run a second model (or the base with the adapter off) beside the policy at every step. Here, before the first
step, one pass without gradients scores every sequence the loss compares against the reference (a pair's chosen and
rejected answers; a KTO row's answer and its KL sequence), train and held-out, with the weights the run starts from:
the base for a new adapter (whose B is zero), the base with adapter.init's adapter, a full fine-tune's initial
weights. No second model is loaded. The result lies beside the tokenization cache, keyed by what could change it, so
a rerun and --resume read it instead of scoring again (and a resumed run compares against exactly the same values).
With --nproc each rank scores its share and all ranks gather the whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from lorakit import adapter, attention, files, loss, model, preference_train
from lorakit.config import RunConfig

VERSION = 1  # bump when what is scored changes (e.g. KTO's KL pairing), to leave old results unused
WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".json")


def attach(
    cfg: RunConfig,
    data_folder: Path,
    net: Any,
    train_items: list[dict],
    eval_items: list[dict],
    accelerator: Accelerator,
    pad: int,
    use_positions: bool,
    dtype: torch.dtype,
) -> float | None:
    """Give every item its reference log-probs (preference_train.with_reference): read where a run with the same
    data, model and starting weights scored them, else scored now with `net` as it starts (not yet prepared by
    accelerate). Returns the seconds spent scoring (0.0: read), None where there is no reference: ORPO needs none;
    SFT has no items."""
    if cfg.objective not in ("dpo", "kto"):
        return None
    how = attention.name(net)
    flat, share = attention.padding_free(how), attention.shares_prefix(how)
    path = cache_file(cfg, data_folder, dtype, how)
    found = broadcast_object_list([path.is_file()])[0]  # the main rank's view: every rank takes the same branch
    seconds = 0.0
    if found:
        values = load_file(path)
        accelerator.print(f"reference log-probs: read from {path}")
    else:
        tic = time.perf_counter()
        how_to = (cfg.train.batch_size, pad, use_positions, flat, accelerator, share)
        values = {"train": log_probs(net, train_items, *how_to)}
        if eval_items:
            values["eval"] = log_probs(net, eval_items, *how_to)
        n = 2 * (len(train_items) + len(eval_items))
        if accelerator.is_main_process:
            with files.atomic_file(path) as tmp:
                save_file(values, tmp)
        seconds = time.perf_counter() - tic
        accelerator.print(
            f"reference log-probs: {n} sequences scored with the starting weights in {seconds:.1f} s, kept for "
            f"reruns and --resume in {path}"
        )
    preference_train.with_reference(train_items, values["train"], cfg.objective)
    preference_train.with_reference(eval_items, values.get("eval"), cfg.objective)
    return seconds


def log_probs(
    net: Any,
    all_items: list[dict],
    batch_size: int,
    pad: int,
    use_positions: bool,
    flat: bool,
    accelerator: Accelerator,
    share: bool = False,
) -> torch.Tensor:
    """The summed log-probs of each item's scored sequences, (items, 2) fp32 on the CPU (items, 1 where each item
    has one: `lorakit eval` of KTO rows, which needs no KL sequence): no gradients, dropout
    off. Each rank scores its share, and every rank gets the whole. `net` is not yet prepared by accelerate (train.setup
    calls this before): each rank's forwards are its own, with no collective in them, under FSDP too."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(all_items), world))
    mine.sort(key=lambda i: -preference_train.tokens(all_items[i]))  # micro-batches of like lengths pad less
    scored: list[tuple[list[int], torch.Tensor]] = []
    with model.evaluating(net), torch.no_grad():
        for j in range(0, len(mine), batch_size):
            chunk = mine[j : j + batch_size]
            batch = preference_train.collate([all_items[i]["scored"] for i in chunk], pad, use_positions, flat, share)
            with accelerator.autocast():
                logps, _ = loss.sequence_logps(net, {k: v.to(accelerator.device) for k, v in batch.items()})
            scored.append((chunk, logps.float().cpu().reshape(len(chunk), -1)))
    out = torch.zeros(len(all_items), len(all_items[0]["scored"]) if all_items else 2, dtype=torch.float32)
    for chunk, values in gather_object(scored):
        out[chunk] = values
    return out


def cache_file(cfg: RunConfig, data_folder: Path, dtype: torch.dtype, attention: str) -> Path:
    """Where the reference of this run lies: in its tokenized data's cache folder, under a key of the starting
    weights (the base's files, adapter.init's adapter), how they compute (method, dtype, attention, kernels) and what
    is scored (pairs, or KTO rows with their KL sequences)."""
    key = {
        "version": VERSION,
        "scored": "kto" if cfg.objective == "kto" else "pairs",
        "model": model_fingerprint(cfg.model),
        "init": adapter_fingerprint(cfg.adapter.init, cfg.model) if cfg.adapter.init else None,
        "method": cfg.method,
        "dtype": str(dtype),
        "attention": attention,
        "kernels": cfg.train.kernels,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return data_folder / "reference" / f"{digest}.safetensors"


def model_fingerprint(name: str) -> list:
    """What identifies the base's weights without reading them: where it resolves to, and the name, size and time
    of each of its files (a hub model: the cached snapshot its config.json lies in, whose path names the commit)."""
    where = model.resolve(name)
    if where.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        return [name, cached if isinstance(cached, str) else None]
    folder = Path(where.path)
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILES))
    return [str(folder), where.gguf_file, [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in found]]


def adapter_fingerprint(path: str, base: str) -> str:
    """A hash of adapter.init's files (its config and weights: small beside a model)."""
    folder = adapter.init_adapter(path, base)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.startswith("adapter_"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()
