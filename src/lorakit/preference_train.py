"""What train.py does differently for a preference objective (dpo, orpo, kto): its items, their micro-batches, one
optimizer step's forward and backward, and the held-out evaluation. The losses are objectives.py's; the reference
log-probs come from reference.py, computed once before the first step.

An item is what the data order shuffles and a step counts: a pair (its chosen and rejected answers, each a whole
sequence: prompt + answer) or a KTO row (its answer, and the mismatched sequence of KTO's KL estimate: its prompt with
the answer of the row before it). A pair's two sequences are in the same micro-batch, padding-free where the model's
attention allows (one row of restarting positions, packing.collate): one forward and one backward over both. Where
the attention reads branches (attention.shares_prefix), the rejected answer is a branch of the chosen one: the
prompt they share runs once (TRL runs it twice, as two rows), which saved 16% of the tokens of LLaMA-Factory's
dpo_en_demo pairs in bench/dpo_vs_trl.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from lorakit import loss, objectives, packing, preference
from lorakit.config import PreferenceConfig
from lorakit.model import evaluating
from lorakit.render import IGNORE


def items(ds: Any, objective: str, max_length: int) -> list[dict]:
    """The items of a prepared preference set (data.prepare's columns), as plain lists: each with `sequences` (what
    the policy trains on: a pair's chosen and rejected, a KTO row's answer) and `scored` (what the reference scores:
    a pair's two; a KTO row's answer and its KL sequence); KTO rows also with `desirable`."""
    if ds is None:
        return []
    if objective != "kto":
        columns = zip(ds["chosen_input_ids"], ds["chosen_labels"], ds["rejected_input_ids"], ds["rejected_labels"])
        out = []
        for ci, cl, ri, rl in columns:
            pair = [{"input_ids": ci, "labels": cl}, {"input_ids": ri, "labels": rl}]
            out.append({"sequences": pair, "scored": pair})
        return out
    rows = [
        {"input_ids": i, "labels": lab, "prompt_len": n}
        for i, lab, n in zip(ds["input_ids"], ds["labels"], ds["prompt_len"])
    ]
    out = []
    for k, (row, label) in enumerate(zip(rows, ds["label"])):
        answer = {"input_ids": row["input_ids"], "labels": row["labels"]}
        kl = kl_sequence(row, rows[k - 1], max_length)  # k - 1: the last row's for the first
        out.append({"sequences": [answer], "scored": [answer, kl], "desirable": bool(label)})
    return out


def kl_sequence(row: dict, other: dict, max_length: int) -> dict:
    """KTO's mismatched sequence: `row`'s prompt followed by `other`'s answer, cut at its end to max_length.

    The pairing is fixed (each row with the one before it in the set), not drawn per step as TRL's batches draw it,
    so that its reference log-prob is computed once with the rest."""
    prompt, start = row["input_ids"][: row["prompt_len"]], other["prompt_len"]
    ids = (prompt + other["input_ids"][start:])[:max_length]
    labels = ([IGNORE] * len(prompt) + other["labels"][start:])[:max_length]
    return {"input_ids": ids, "labels": labels}


def unit(objective: str) -> str:
    """What an item of the objective is called where a run counts them (its steps, the note on repeats)."""
    return "pairs" if preference.is_pairs(objective) else "rows"


def tokens(item: dict) -> int:
    """Input tokens the policy trains on for `item` (what a step's rows weigh: micro_batches groups by it)."""
    return sum(len(s["input_ids"]) for s in item["sequences"])


def branch(root: dict, seq: dict) -> dict:
    """`seq` as a branch of `root` (packing.collate's `start`): the tokens both begin with and neither trains (the
    prompt of a pair, or of a KTO row and its KL sequence) are left to `root`, but for the last of them, which `seq`
    keeps: its position predicts seq's first answer token. A sequence that shares fewer than 2 stays whole."""
    k = 0
    for a, b, la, lb in zip(root["input_ids"], seq["input_ids"], root["labels"], seq["labels"]):
        if a != b or la != IGNORE or lb != IGNORE:
            break
        k += 1
    if k < 2:
        return seq
    return {"input_ids": seq["input_ids"][k - 1 :], "labels": seq["labels"][k - 1 :], "start": k - 1}


def collate(
    groups: list[list[dict]], pad: int, use_positions: bool, flat: bool, share: bool = False
) -> dict[str, torch.Tensor]:
    """One micro-batch of sequences, grouped by item (a pair's two), as packing.collate builds it, with `segments`
    (B, L): the sequence each position belongs to, numbered in order (-1: padding); loss.sequence_logps sums by it.

    A group shares a row where the model reads packed rows (use_positions), the whole micro-batch one row where its
    attention is padding-free (flat); otherwise every sequence is a row of its own, padded to the longest. share
    (the attention reads branches, attention.shares_prefix): a group's later sequences are branches of its first."""
    if share and (flat or use_positions):
        groups = [[g[0], *(branch(g[0], s) for s in g[1:])] for g in groups]
    sequences = [s for g in groups for s in g]
    rows = groups if use_positions else [[s] for s in sequences]
    batch = packing.collate(rows, pad, use_positions, flat)
    layout = [sequences] if flat else rows
    segments = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for b, row in enumerate(layout):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            segments[b, at : at + n] = k
            at, k = at + n, k + 1
    batch["segments"] = segments
    return batch


def micro_batch(chosen: list[dict], pad: int, use_positions: bool, flat: bool, share: bool = False) -> dict[str, Any]:
    """A micro-batch of items: the policy's `batch` (a pair's chosen and rejected in turn), the reference's
    log-probs `ref` in that order, and for KTO `desirable`, the KL sequences' `kl_batch` and their reference
    `kl_ref`. `tokens`: the input tokens of the items' sequences; `shared`: those of them that ran once for two
    sequences (share: a prompt read by its branch)."""
    batch = collate([it["sequences"] for it in chosen], pad, use_positions, flat, share)
    n = sum(tokens(it) for it in chosen)
    out: dict[str, Any] = {
        "batch": batch,
        "items": len(chosen),
        "tokens": n,
        "shared": n - int((batch["segments"] >= 0).sum()),
        "ref": torch.tensor([r for it in chosen for r in it["ref"]]) if "ref" in chosen[0] else None,
    }
    if "desirable" in chosen[0]:
        out["desirable"] = torch.tensor([it["desirable"] for it in chosen])
        # One sequence a group: nothing to branch (the answer it shares a prompt with is in `batch`).
        out["kl_batch"] = collate([it["scored"][1:] for it in chosen], pad, use_positions, flat)
        out["kl_ref"] = torch.tensor([it["kl_ref"] for it in chosen])
    return out


def with_reference(all_items: list[dict], values: torch.Tensor | None, objective: str) -> None:
    """Give each item its reference log-probs (values: (items, 2) as reference.log_probs scores them): a pair's
    `ref` [chosen, rejected]; a KTO row's `ref` [answer] and `kl_ref`. ORPO has none."""
    if values is None:
        return
    for it, (a, b) in zip(all_items, values.tolist()):
        if objective == "kto":
            it["ref"], it["kl_ref"] = [a], b
        else:
            it["ref"] = [a, b]


def accumulate(
    step_fn: Any, net: Any, micro: list[dict], accelerator: Accelerator, objective: str, settings: PreferenceConfig
) -> tuple[dict[str, float], int, int]:
    """Forward and backward over one optimizer step's micro-batches of items.

    The loss is the mean over the step's items on all ranks: each micro-batch's summed item losses are scaled by the
    step's item count, so grad-accum 4 x batch 2 gives the gradient of batch 8 (as train.accumulate does for SFT's
    tokens). Returns the step's metrics over all ranks (objectives.metrics: loss, rewards, log-probs; KTO's kl), the
    answers' trained tokens on all ranks, and this rank's input tokens (its sequences': a shared prompt counts in
    each).
    """
    world = accelerator.num_processes
    n_items = int(accelerator.reduce(torch.tensor(sum(m["items"] for m in micro), device=accelerator.device), "sum"))
    kl = step_kl(net, micro, accelerator) if objective == "kto" else None
    total = torch.zeros(len(objectives.SUMS) + 1, dtype=torch.float64, device=accelerator.device)
    n_tokens = 0
    for k, m in enumerate(micro):
        batch = {key: v.to(accelerator.device) for key, v in m["batch"].items()}
        last = k == len(micro) - 1
        with accelerator.no_sync(step_fn) if not last else nullcontext(), accelerator.autocast():
            logps, counts = step_fn(**batch)  # loss.OnSequences, prepared by accelerate
            losses, sums = objectives.item_losses(objective, settings, logps, counts, *_extras(m, accelerator, kl))
            # DDP averages gradients over ranks; scaling by their count turns that into a sum.
            accelerator.backward(losses.sum() * world / max(n_items, 1))
        total += torch.cat([sums, counts.sum().reshape(1).to(torch.float64)])
        n_tokens += m["tokens"]
    total = accelerator.reduce(total, "sum")
    metrics = objectives.metrics(total[:-1]) | ({} if kl is None else {"kl": float(kl)})
    return metrics, int(total[-1]), n_tokens


def _extras(m: dict, accelerator: Accelerator, kl: torch.Tensor | None) -> tuple:
    """item_losses' arguments after counts: the micro-batch's reference log-probs (and KTO's labels and KL)."""
    ref = None if m["ref"] is None else m["ref"].to(accelerator.device)
    if "desirable" not in m:
        return (ref,)
    return ref, m["desirable"].to(accelerator.device), kl


def step_kl(net: Any, micro: list[dict], accelerator: Accelerator) -> torch.Tensor:
    """KTO's KL estimate over all micro-batches of a step, on all ranks: the policy's log-probs of the mismatched
    sequences (no gradient, as in TRL) less the reference's, averaged."""
    diff = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for m in micro:
            batch = {key: v.to(accelerator.device) for key, v in m["kl_batch"].items()}
            with accelerator.autocast():
                logps, _ = loss.sequence_logps(net, batch)
            diff += torch.stack([(logps - m["kl_ref"].to(logps.device)).sum().double(), torch.tensor(m["items"])])
    diff = accelerator.reduce(diff, "sum")
    return objectives.kl_estimate(diff[0], diff[1])


def evaluate(
    net: Any,
    held_out: list[dict],
    batch_size: int,
    pad: int,
    use_positions: bool,
    flat: bool,
    accelerator: Accelerator,
    objective: str,
    settings: PreferenceConfig,
    share: bool = False,
) -> dict[str, float]:
    """The objective's metrics over the held-out items, as eval_loss, eval_rewards_accuracy, ...: no gradients,
    dropout off, each rank taking its share (every item under FSDP, whose forwards all ranks make alike; the sums
    then grow n-fold together, and their ratios are the same)."""
    mine = held_out if accelerator.is_fsdp2 else held_out[accelerator.process_index :: accelerator.num_processes]
    batches = [
        micro_batch(mine[j : j + batch_size], pad, use_positions, flat, share) for j in range(0, len(mine), batch_size)
    ]
    total = torch.zeros(len(objectives.SUMS), dtype=torch.float64, device=accelerator.device)
    with evaluating(net):
        kl = step_kl(net, batches, accelerator) if objective == "kto" else None
        with torch.no_grad():
            for m in batches:
                batch = {key: v.to(accelerator.device) for key, v in m["batch"].items()}
                with accelerator.autocast():
                    logps, counts = loss.sequence_logps(net, batch)
                    total += objectives.item_losses(objective, settings, logps, counts, *_extras(m, accelerator, kl))[1]
    out = objectives.metrics(accelerator.reduce(total, "sum"), prefix="eval_")
    if kl is not None:
        out["eval_kl"] = float(kl)
    return out
