"""Packing: rows fill well, never mix labels across examples, and give the same loss as unpacked."""

import random

import pytest
import torch

from lorakit import loss, packing, render
from lorakit.render import IGNORE
from tiny import tiny_model, tiny_tokenizer


def test_pack_respects_max_length_and_keeps_every_example():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    rows = packing.pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    fill = sum(lengths) / (len(rows) * 512)
    assert fill > 0.95, fill


def test_pack_refuses_overlong_examples():
    with pytest.raises(ValueError, match="truncate first"):
        packing.pack([10, 600], 512)


def test_collate_restarts_positions_and_ignores_cross_example_targets():
    a = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE, 5]}
    c = {"input_ids": [6], "labels": [6]}
    batch = packing.collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # The first label of each example is ignored: no example learns to predict its neighbour.
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE] * 5]
    assert "attention_mask" not in batch


def test_collate_unpacked_uses_attention_mask():
    batch = packing.collate(
        [[{"input_ids": [1, 2], "labels": [1, 2]}], [{"input_ids": [3], "labels": [3]}]],
        pad_id=0,
        use_position_ids=False,
    )
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="need position_ids"):
        packing.collate([[{"input_ids": [1], "labels": [1]}, {"input_ids": [2], "labels": [2]}]], 0, False)


def examples(tok, n=6):
    rng = random.Random(1)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "model",
        "learns",
        "answer",
        "questions",
        "about",
        "weather",
    ]
    out = []
    for i in range(n):
        chat = [
            {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 12)))},
            {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 15)))},
        ]
        if i % 3 == 2:  # some multi-turn rows
            chat += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "the dog sleeps"}]
        enc = render.encode(tok, {"messages": chat}, train_on="all" if i == 0 else "completions")
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3"])
def test_packed_loss_equals_mean_loss_of_examples_one_by_one(arch):
    tok = tiny_tokenizer("chatml")
    model = tiny_model(arch, tok).eval()
    exs = examples(tok)
    lengths = [len(e["input_ids"]) for e in exs]
    rows = packing.pack(lengths, max_length=sum(lengths) // 2 + max(lengths))
    assert any(len(r) > 1 for r in rows), "the test must actually pack"
    with torch.no_grad():
        packed = packing.collate([[exs[i] for i in row] for row in rows], pad_id=tok.pad_token_id)
        total, count = loss.loss_sum(model, packed)
        packed_loss = total / count
        # Reference: plain HF forward on each example alone, no packing and no lorakit loss code.
        sums, counts = 0.0, 0
        for e in exs:
            ids = torch.tensor([e["input_ids"]])
            labels = torch.tensor([e["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != IGNORE
            sums += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            counts += int(keep.sum())
    assert count == counts
    assert abs(packed_loss.item() - sums / counts) < 1e-4, (packed_loss.item(), sums / counts)


def test_packing_without_position_ids_would_leak_attention():
    # Guard for the test above: without restarting positions the loss differs, so the check has teeth.
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", tok).eval()
    exs = examples(tok)
    with torch.no_grad():
        packed = packing.collate([exs], pad_id=tok.pad_token_id)
        good = loss.loss_sum(model, packed)
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
        leaky = loss.loss_sum(model, packed)
    assert abs(good[0].item() - leaky[0].item()) > 1e-3


def test_bloom_unpacked_loss_matches_plain_forward():
    tok = tiny_tokenizer("chatml")
    model = tiny_model("bloom", tok).eval()
    exs = examples(tok, 3)
    with torch.no_grad():
        batch = packing.collate([[e] for e in exs], pad_id=tok.pad_token_id, use_position_ids=False)
        total, count = loss.loss_sum(model, batch)
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        ref_total = torch.nn.functional.cross_entropy(ref[keep], target[keep], reduction="sum")
    assert count == int(keep.sum()) and torch.allclose(total, ref_total, atol=1e-4)


def test_flat_collate_is_one_padding_free_row_of_every_example():
    a = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE, 5]}
    c = {"input_ids": [6], "labels": [6]}
    batch = packing.collate([[a, b], [c]], pad_id=0, use_position_ids=False, flat=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE]]
    assert "attention_mask" not in batch


def test_a_one_row_batch_counts_no_padding_even_when_it_ends_in_the_pad_id():
    from lorakit import train

    # eos is the pad token where a tokenizer has none (model.with_pad): a flat micro-batch often ends in it.
    eos = 0
    batch = packing.collate([[{"input_ids": [5, 6, eos], "labels": [5, 6, eos]}]], pad_id=eos)
    assert train._padding(batch, eos) == 0
    padded = packing.collate([[{"input_ids": [5, eos], "labels": [5, eos]}], [{"input_ids": [7], "labels": [7]}]], eos)
    assert train._padding(padded, eos) == 2  # rows of several: the trailing pad ids (its eos counted with them)
