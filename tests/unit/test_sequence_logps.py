"""Per-sequence log-probs of a padding-free micro-batch (loss.sequence_logps, preference_train.collate) equal a
plain Hugging Face forward of each sequence alone, in value and in gradient, with a pair's prompt run once (its
rejected answer a branch of the chosen one) too; KTO's mismatched KL sequences."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import attention, loss, preference_train
from lorakit.render import IGNORE
from tiny import tiny_model, tiny_tokenizer


def sequences(n: int, seed: int = 0, prompts: tuple = (3, 12), answers: tuple = (1, 9)) -> list[list[dict]]:
    """n pairs of random sequences sharing a prompt, the answers' tokens trained; lengths drawn in [low, high)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(10, 600, (int(torch.randint(*prompts, (), generator=gen)),), generator=gen).tolist()
        pair = []
        for _ in range(2):
            answer = torch.randint(10, 600, (int(torch.randint(*answers, (), generator=gen)),), generator=gen).tolist()
            pair.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
        out.append(pair)
    return out


def plain_logps(model, seqs: list[dict]) -> torch.Tensor:
    """Each sequence alone through the model's own forward: log_softmax of its logits at its trained targets."""
    out = []
    for s in seqs:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(s["labels"][1:])
        keep = labels != IGNORE
        out.append(F.log_softmax(logits[keep], -1).gather(1, labels[keep, None]).sum())
    return torch.stack(out)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("chatml")


@pytest.mark.parametrize(("arch", "head_trains", "use_positions", "flat"), [
    ("llama", False, True, True),  # LoRA: a frozen head, one padding-free row
    ("llama", True, True, False),  # full fine-tuning: the head trains; each pair in a packed row
    ("gemma2", True, True, True),  # logit soft-capping, eager attention
    ("llama", False, False, False),  # a model that cannot read packed rows: padded rows with a mask
])  # fmt: skip
def test_sequence_logps_equal_a_plain_forward_in_value_and_gradient(tok, arch, head_trains, use_positions, flat):
    model = tiny_model(arch, tok)
    attention.use(model, "cpu", torch.float32)
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    pairs = sequences(5)
    batch = preference_train.collate(pairs, tok.pad_token_id, use_positions, flat)
    weights = torch.randn(10, generator=torch.Generator().manual_seed(1))  # a loss weighing each sequence its own
    got, counts = loss.sequence_logps(model, batch)
    flat_seqs = [s for p in pairs for s in p]
    assert counts.tolist() == [sum(x != IGNORE for x in s["labels"][1:]) for s in flat_seqs]
    params = [p for p in model.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad((weights * got).sum(), params)
    want = plain_logps(model, flat_seqs)
    want_grads = torch.autograd.grad((weights * want).sum(), params)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-3), (g - w).abs().max()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])  # sdpa; eager with soft-cap; sdpa, sliding windows
def test_a_shared_prompt_runs_once_and_gives_each_answer_its_whole_sequences_logps_and_gradient(tok, arch):
    # Prompts longer than the tiny Gemmas' window (16): a branch's window reaches back into the prompt it shares.
    model = tiny_model(arch, tok)
    assert attention.shares_prefix(attention.use(model, "cpu", torch.float32))
    model.get_output_embeddings().weight.requires_grad_(True)
    pairs = sequences(4, seed=2, prompts=(12, 30), answers=(1, 14))
    batch = preference_train.collate(pairs, tok.pad_token_id, True, True, share=True)
    prompts = [next(i for i, x in enumerate(p[0]["labels"]) if x != IGNORE) for p in pairs]
    whole = sum(len(s["input_ids"]) for p in pairs for s in p)
    assert batch["input_ids"].shape == (1, whole - sum(n - 1 for n in prompts))  # each prompt but its last token once
    weights = torch.randn(8, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    got, _ = loss.sequence_logps(model, batch)
    got_grads = torch.autograd.grad((weights * got).sum(), params)
    want = plain_logps(model, [s for p in pairs for s in p])
    want_grads = torch.autograd.grad((weights * want).sum(), params)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-3), (g - w).abs().max()


def test_a_branch_shares_only_untrained_tokens_both_begin_with():
    root = {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, IGNORE, 8, 9]}
    # The same prompt, and an answer that begins as the root's: its first answer token is its own to train.
    seq = {"input_ids": [5, 6, 7, 8, 4], "labels": [IGNORE, IGNORE, IGNORE, 8, 4]}
    assert preference_train.branch(root, seq) == {"input_ids": [7, 8, 4], "labels": [IGNORE, 8, 4], "start": 2}
    other_prompt = {"input_ids": [5, 3, 7, 8], "labels": [IGNORE, IGNORE, IGNORE, 8]}
    assert preference_train.branch(root, other_prompt) is other_prompt  # one token in common: kept whole
    batch = preference_train.collate([[root, seq]], 0, True, True, share=True)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4]
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, IGNORE, 8, 9, IGNORE, 8, 4]
    assert batch["segments"][0].tolist() == [0] * 5 + [1] * 3
    spans = attention.rows(batch["position_ids"], 1, 8)[0]
    assert spans == [(0, 5, 0, 0), (5, 8, 0, 2)]  # the branch reads the root's first 2 tokens, then its own


def test_collate_numbers_each_sequence_and_leaves_padding_out(tok):
    pairs = sequences(3)
    lengths = [len(s["input_ids"]) for p in pairs for s in p]
    flat = preference_train.collate(pairs, tok.pad_token_id, True, True)
    assert flat["input_ids"].shape == (1, sum(lengths))
    assert flat["segments"][0].tolist() == [k for k, n in enumerate(lengths) for _ in range(n)]
    padded = preference_train.collate(pairs, tok.pad_token_id, False, False)
    assert padded["input_ids"].shape == (6, max(lengths))
    for k, n in enumerate(lengths):
        assert padded["segments"][k].tolist() == [k] * n + [-1] * (max(lengths) - n)


def test_kto_kl_sequence_is_the_prompt_with_the_other_rows_answer_cut_at_its_end():
    row = {"input_ids": [1, 2, 3, 40, 41], "labels": [IGNORE] * 3 + [40, 41], "prompt_len": 3}
    other = {"input_ids": [7, 8, 50, 51, 52, 53], "labels": [IGNORE, IGNORE, 50, 51, 52, 53], "prompt_len": 2}
    kl = preference_train.kl_sequence(row, other, max_length=6)
    assert kl == {"input_ids": [1, 2, 3, 50, 51, 52], "labels": [IGNORE] * 3 + [50, 51, 52]}


@pytest.mark.parametrize("head_trains", [False, True])
def test_token_losses_under_fp16_autocast_scale_each_token_by_its_own_gradient(head_trains):
    # train.precision fp16: the head's matmuls in fp16, each token's gradient kept in fp32 until backward scales it by
    # its sequence's upstream gradient (here past fp16's largest value, as a loss scale of 2^16 makes it).
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 64, generator=gen).half().requires_grad_(True)
    weight = (0.3 * torch.randn(500, 64, generator=gen)).requires_grad_(head_trains)
    targets = torch.randint(0, 500, (40,), generator=gen)
    scale = 65536.0 * torch.rand(40, generator=gen)
    wrt = [hidden, weight] if head_trains else [hidden]
    with torch.autocast("cpu", dtype=torch.float16):
        got = loss.linear_token_losses(hidden, weight, targets)
    got_grads = torch.autograd.grad((got * scale).sum(), wrt)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    want = F.cross_entropy(exact[0] @ exact[1].t(), targets, reduction="none")
    want_grads = torch.autograd.grad((want * scale.double()).sum(), [t for t in exact if t.requires_grad])
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all() and float((g.double() - w).norm() / w.norm()) < 1e-2
