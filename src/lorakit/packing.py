"""Padding-free packing of tokenized examples into rows, and collation into model batches.

A packed row holds several examples back to back. `position_ids` restart at 0 at each example and no
`attention_mask` is passed, which is how transformers recognizes packed rows: its mask builders
(sdpa, eager, flex) and flash-attention's varlen kernels then keep attention inside each example.
A flat micro-batch is all its rows' examples in one such row, with no padding at all: attention.py keeps
each example to itself there at the cost of its own length.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lorakit.render import IGNORE


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (best-fit decreasing).

    Best-fit decreasing fills rows to ~99% on typical length mixes, where greedy in-order packing
    leaves 10-20% of each row empty. Examples longer than `max_length` must be truncated before.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, row index), sorted, for bisect lookups
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}; truncate first")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, row))
        else:
            rows.append([i])
            if max_length - n > 0:
                bisect.insort(free, (max_length - n, len(rows) - 1))
    return rows


def unpacked(n: int) -> list[list[int]]:
    """One example per row (packing off)."""
    return [[i] for i in range(n)]


def collate(
    rows: Sequence[Sequence[dict]], pad_id: int, use_position_ids: bool = True, flat: bool = False
) -> dict[str, torch.Tensor]:
    """Build a batch from rows of examples (each a dict with input_ids and labels).

    Returns input_ids, labels (B, L) and either position_ids (B, L) (packed, padding-free) or
    attention_mask (B, L) for models that cannot read packed rows from position ids (e.g. ALiBi in
    Bloom). The first label of each example is IGNORE so that no example learns to predict the next
    one across the boundary. Padding at a row's end is its own segment with labels IGNORE.
    flat: every example of every row back to back in one row (1, T), position ids restarting at each;
    no padding (attention.padding_free says which attentions keep its examples apart at their own cost).
    An example with `start` p > 0 (preference_train.branch) is a branch: its position ids go on from p, and
    attention.shares_prefix's attentions let it read the first p tokens of the last example before it that starts
    at 0, as if they were its own.
    """
    if flat:
        rows, use_position_ids = [[ex for row in rows for ex in row]], True
    ids_rows, label_rows, pos_rows = [], [], []
    for row in rows:
        ids, labels, pos = [], [], []
        for ex in row:
            ids += ex["input_ids"]
            labels += [IGNORE, *ex["labels"][1:]]
            start = ex.get("start", 0)
            pos += range(start, start + len(ex["input_ids"]))
        ids_rows.append(ids)
        label_rows.append(labels)
        pos_rows.append(pos)
    width = max(len(r) for r in ids_rows)
    batch_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    batch_pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, labels, pos) in enumerate(zip(ids_rows, label_rows, pos_rows)):
        n = len(ids)
        batch_ids[b, :n] = torch.tensor(ids)
        batch_labels[b, :n] = torch.tensor(labels)
        batch_pos[b, :n] = torch.tensor(pos)
        batch_pos[b, n:] = torch.arange(width - n)  # padding restarts at 0: a segment of its own
        mask[b, :n] = 1
    if use_position_ids:
        return {"input_ids": batch_ids, "labels": batch_labels, "position_ids": batch_pos}
    if any(len(r) > 1 for r in rows):
        raise ValueError("rows with several examples need position_ids; this model cannot read packed rows")
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": mask}
