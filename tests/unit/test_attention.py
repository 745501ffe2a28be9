"""Padding-free micro-batches: one row of all the examples, attention kept to each, at each one's own cost."""

import itertools
import random

import pytest
import torch

from lorakit import attention, loss, packing, plan
from lorakit.render import IGNORE
from tiny import tiny_model, tiny_tokenizer


def rows_of(lengths, seed=0):
    """Examples of these lengths, each trained on its second half (completion-style labels)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(10, 600) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]})
    return out


# Longer than the tiny Gemmas' sliding window (16), so their local layers' windows bite inside a row.
LENGTHS = [37, 9, 22, 51, 14]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3"])
def test_padding_free_loss_and_gradients_equal_padded_rows(arch):
    tok = tiny_tokenizer("chatml")
    exs = rows_of(LENGTHS)
    padded = packing.collate([[e] for e in exs], tok.pad_token_id, use_position_ids=False)
    flat = packing.collate([[e] for e in exs], tok.pad_token_id, flat=True)
    assert flat["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in flat

    def loss_and_grads(batch, per_row):
        model = tiny_model(arch, tok)
        own = attention.name(model)
        if per_row:
            assert attention.use(model, "cpu", torch.float32) == f"{own}-per-row"
        total, count = loss.loss_sum(model, batch)
        total.backward()
        return total.item(), count, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    want, got = loss_and_grads(padded, False), loss_and_grads(flat, True)
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert torch.allclose(got[2], want[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_attention_never_crosses_rows_and_runs_on_each_rows_own_length(arch, monkeypatch):
    tok = tiny_tokenizer("chatml")
    model = tiny_model(arch, tok).eval()
    attention.use(model, "cpu", torch.float32)
    exs = rows_of(LENGTHS)
    changed = [dict(e) for e in exs]
    changed[1] = {**exs[1], "input_ids": [(t + 7) % 600 for t in exs[1]["input_ids"]]}
    lengths = []  # the query length of every attention product the model computes
    real_matmul = torch.matmul
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, *a, **k):
        lengths.append(q.shape[-2])
        return real_sdpa(q, *a, **k)

    def matmul(a, b, *rest, **k):  # eager attention's q @ k^T
        if a.dim() == 4 and b.dim() == 4 and a.shape[-1] == b.shape[-2] == model.config.head_dim:
            lengths.append(a.shape[-2])
        return real_matmul(a, b, *rest, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(torch, "matmul", matmul)
    with torch.no_grad():
        before = model(**packing.collate([[e] for e in exs], 0, flat=True), use_cache=False).logits[0]
        after = model(**packing.collate([[e] for e in changed], 0, flat=True), use_cache=False).logits[0]
    edges = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for i, (s, e) in enumerate(itertools.pairwise(edges)):
        same = torch.allclose(before[s:e], after[s:e], atol=1e-6)
        assert same == (i != 1), f"row {i}"  # only the changed row's logits change
    # Row by row: no attention product over the whole micro-batch (its cost would grow with the square of it).
    assert lengths and max(lengths) == max(LENGTHS), sorted(set(lengths))


def test_generation_with_padding_and_cache_is_unchanged():
    tok = tiny_tokenizer("chatml")
    prompts = rows_of([5, 12, 8], seed=1)
    width = max(len(p["input_ids"]) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts])  # left-padded
    mask = (torch.arange(width) >= width - torch.tensor([len(p["input_ids"]) for p in prompts])[:, None]).long()
    for arch in ("llama", "gemma2"):
        model = tiny_model(arch, tok).eval()
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        attention.use(model, "cpu", torch.float32)
        assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False).equal(plain)


def test_choose_keeps_the_models_own_attention_where_rows_cannot_be_kept_apart():
    tok = tiny_tokenizer("chatml")
    bloom = tiny_model("bloom", tok)  # ALiBi: no position ids to read rows from
    assert attention.choose(bloom, "cpu", torch.float32) == attention.name(bloom) == "eager"
    assert not attention.padding_free(attention.name(bloom))
    assert attention.padding_free("sdpa-per-row") and attention.padding_free("flash_attention_2")
    assert not attention.supports_config({"model_type": "bloom"})
    assert attention.supports_config({"model_type": "llama"})


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_plan_counts_the_attention_mask_training_builds(arch):
    tok = tiny_tokenizer("chatml")
    model = tiny_model(arch, tok)
    attention.use(model, "cpu", torch.float32)
    exs = rows_of([64, 40, 23])
    flat = attention.padding_free(attention.name(model))
    batch = packing.collate([[e] for e in exs], tok.pad_token_id, attention.reads_packed_rows(model), flat)
    seen = []  # the mask each attention layer is handed, in bytes

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append(0 if mask is None else mask.numel() * mask.element_size())

    for m in model.modules():
        if type(m).__name__.endswith("Attention"):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        loss.loss_sum(model, batch)
    parts = plan.memory(plan.shape_of(model.config.to_dict()), plan.Setup(seq_len=64, batch=3, device="cpu"))
    assert seen and set(seen) == {parts.get("attention_mask", 0)}
    assert ("attention_mask" in parts) == (arch == "bloom")
