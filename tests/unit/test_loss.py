"""The chunked head + loss gives the loss and gradients of the plain head + cross-entropy it replaces."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import loss, packing, train
from tiny import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_head_matches_logits_and_cross_entropy(softcap, head_trains, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * 5000 * 64)  # 64 rows a chunk: 300 rows take five chunks
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(5000, 64, dtype=torch.float64, generator=gen)).requires_grad_(head_trains)
    targets = torch.randint(0, 5000, (300,), generator=gen)

    def reference(h, w):
        z = h @ w.t()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return F.cross_entropy(z, targets, reduction="sum")

    wrt = [hidden, weight] if head_trains else [hidden]
    want = reference(hidden, weight)
    want_grads = torch.autograd.grad(3 * want, wrt)  # a scaled loss, as train.accumulate backpropagates
    got = loss.linear_cross_entropy(hidden, weight, targets, softcap)
    got_grads = torch.autograd.grad(3 * got, wrt)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # the chunks sum in fp32
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6), (g - w).abs().max()
    with torch.no_grad():  # evaluation: the loss alone, no gradient buffers
        assert loss.linear_cross_entropy(hidden, weight, targets, softcap).item() == pytest.approx(want.item())


def fp16_head_gradients(hidden, weight, targets, scale):
    """d (scale x loss) / d (hidden, weight where it trains) of the chunked head under fp16 autocast (accelerate's
    under train.precision fp16), and of PyTorch's cross-entropy in fp64 on the same values; and both losses."""
    wrt = [hidden, weight] if weight.requires_grad else [hidden]
    with torch.autocast("cpu", dtype=torch.float16):
        got = loss.linear_cross_entropy(hidden, weight, targets)
    got_grads = torch.autograd.grad(got * scale, wrt)  # backward runs outside autocast, as accelerate's does
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    want = F.cross_entropy(exact[0] @ exact[1].t(), targets, reduction="sum")
    want_grads = torch.autograd.grad(want * scale, [t for t in exact if t.requires_grad])
    return got_grads, want_grads, got.item(), want.item()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("head_trains", [False, True])
def test_fp16_head_gradient_under_a_loss_scale_past_fp16s_largest(head_trains):
    # The loss scaler's first scale (2^16) over one trained token: the gradient's factor is 65,536, beyond fp16's
    # 65,504, while the scaled gradient itself fits in fp16. A LoRA run's frozen fp16 head and fp16 hidden states;
    # a full fine-tune's fp32 head (trained) and fp32 residual stream, autocast running the matmuls in fp16.
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if head_trains else torch.float16
    hidden = torch.randn(40, 64, generator=gen).to(dtype).requires_grad_()
    weight = (0.01 * torch.randn(500, 64, generator=gen)).to(dtype).requires_grad_(head_trains)
    targets = torch.randint(0, 500, (40,), generator=gen)
    got, want, got_loss, want_loss = fp16_head_gradients(hidden, weight, targets, scale=2.0**16)
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    for g, w in zip(got, want):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert relative_error(g, w) < 1e-2


@pytest.mark.parametrize("head_trains", [False, True])
def test_fp16_head_keeps_the_gradient_of_confident_predictions(head_trains):
    # Tokens the model predicts confidently: the target's logit 18 above the others, whose probabilities (1.5e-8)
    # are below fp16's smallest (6e-8). Off the target's direction their gradient is all the gradient there is; as
    # fp16 probabilities it flushed to zero. (The target's own term, 1 - p, is as exact as fp32 makes it: left out.)
    gen = torch.Generator().manual_seed(0)
    vocab, width, target = 256, 16, 7
    weight = torch.randn(vocab, width, generator=gen)
    weight[:, 0] = 0.0
    weight[target] = torch.nn.functional.one_hot(torch.tensor(0), width)  # only along the hidden states
    hidden = torch.zeros(4, width)
    hidden[:, 0] = 18.0
    weight, hidden = weight.half().requires_grad_(head_trains), hidden.half().requires_grad_()
    got, want, _, _ = fp16_head_gradients(hidden, weight, torch.full((4,), target), scale=2.0**12)
    assert relative_error(got[0][:, 1:], want[0][:, 1:]) < 1e-2  # d / d hidden, off the target's direction
    if head_trains:  # d / d weight, the rows of the other tokens
        others = torch.arange(vocab) != target
        assert relative_error(got[1][others], want[1][others]) < 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_training_loss_and_gradients_equal_the_models_own(arch):
    # loss_sum takes the chunked path on these heads (gemma2: softcapped logits, tied embeddings); the
    # reference is the model's own logits and PyTorch's cross-entropy, gradients included.
    tok = tiny_tokenizer("chatml")
    model = tiny_model(arch, tok)
    assert loss._fusable(model.get_output_embeddings())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(24).repeat(2, 1)}
    total, count = loss.loss_sum(model, batch)
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=batch["position_ids"]).logits[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), reduction="sum")
    want.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_micro_batches_group_a_steps_rows_by_length_and_keep_every_row():
    tokens = [5, 300, 40, 290, 7, 310, 35, 12]
    step = [0, 1, 2, 3, 4, 5, 6, 7]
    groups = train.micro_batches(step, tokens, 4)
    assert groups == [[5, 1, 3, 2], [6, 7, 4, 0]]  # longest first: a step that cannot fit fails at once
    assert sorted(r for g in groups for r in g) == step

    def padded(gs):
        return sum(len(g) * max(tokens[r] for r in g) for g in gs)

    assert padded(groups) < padded([step[:4], step[4:]]) / 1.5


def test_a_step_of_grouped_micro_batches_gives_the_same_gradient():
    # The step's loss is summed over its micro-batches and divided by its trained tokens: their order and
    # grouping cannot change the gradient, which is why train.run may regroup rows by length.
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", tok)
    gen = torch.Generator().manual_seed(2)
    rows = [{"input_ids": (ids := torch.randint(3, 200, (n,), generator=gen).tolist()), "labels": ids}
            for n in (5, 30, 8, 27)]  # fmt: skip

    def gradient(groups):
        model.zero_grad()
        n = sum(len(rows[r]["labels"]) - 1 for g in groups for r in g)
        for g in groups:
            batch = packing.collate([[rows[r]] for r in g], tok.pad_token_id, use_position_ids=False)
            (loss.loss_sum(model, batch)[0] / n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    as_given = gradient([[0, 1], [2, 3]])
    grouped = gradient(train.micro_batches([0, 1, 2, 3], [5, 30, 8, 27], 2))
    assert torch.allclose(as_given, grouped, atol=1e-6)
