"""The preference losses against TRL 1.16's formulas (transcribed from trl/trainer/dpo_trainer.py,
trl/experimental/orpo/orpo_trainer.py and trl/trainer/kto_trainer.py), and the metrics they are judged by."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit import objectives
from lorakit.config import PreferenceConfig

gen = torch.Generator().manual_seed(0)
PC, PR, RC, RR = (-20 * torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(4))
NC, NR = torch.tensor([3, 5, 8, 1, 12, 4]), torch.tensor([7, 2, 9, 6, 1, 3])


def test_dpo_sigmoid_is_trl_s_and_ln2_where_policy_is_the_reference():
    losses, rc, rr = objectives.dpo(PC, PR, RC, RR, beta=0.1)
    delta = (PC - RC) - (PR - RR)  # TRL: chosen_logratios - rejected_logratios
    assert torch.allclose(losses, -F.logsigmoid(0.1 * delta))
    assert torch.allclose(rc, 0.1 * (PC - RC)) and torch.allclose(rr, 0.1 * (PR - RR))
    same, _, _ = objectives.dpo(PC, PR, PC, PR, beta=0.1)
    assert torch.allclose(same, torch.full_like(same, math.log(2)))


def test_dpo_label_smoothing_is_conservative_dpo():
    losses, _, _ = objectives.dpo(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    z = 0.5 * ((PC - RC) - (PR - RR))
    assert torch.allclose(losses, -0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z))


def test_dpo_ipo_averages_over_the_answers_tokens_as_trl():
    losses, _, _ = objectives.dpo(PC, PR, RC, RR, beta=0.1, loss="ipo", nc=NC, nr=NR)
    ipo_delta = (PC - RC) / NC - (PR - RR) / NR
    assert torch.allclose(losses, (ipo_delta - 1 / (2 * 0.1)) ** 2)


def test_orpo_is_trl_s_odds_ratio_loss_beside_the_chosen_nll():
    pc, pr = PC / NC, PR / NR  # mean per-token log-probs
    losses, rc, rr = objectives.orpo(pc, pr, -pc, orpo_lambda=0.25)
    # TRL: log_odds = (c - r) - (log1mexp(c) - log1mexp(r)); losses = beta * logsigmoid(log_odds);
    # loss = nll - losses.mean(); rewards = beta * mean log-probs.
    log_odds = (pc - pr) - (torch.log(1 - torch.exp(pc)) - torch.log(1 - torch.exp(pr)))
    assert torch.allclose(losses, -pc - 0.25 * F.logsigmoid(log_odds))
    assert torch.allclose(rc, 0.25 * pc) and torch.allclose(rr, 0.25 * pr)
    # Near certainty (a mean log-prob of -1e-9, or 0) the odds stay finite.
    sure, _, _ = objectives.orpo(torch.tensor([-1e-9, 0.0]), torch.tensor([-3.0, -3.0]), torch.zeros(2), 0.1)
    assert torch.isfinite(sure).all()


def test_kto_is_trl_s_with_its_weights_and_kl():
    p, r = PC, RC
    desirable = torch.tensor([True, False, True, True, False, False])
    kl = objectives.kl_estimate(torch.tensor(1.5), 3)
    assert float(kl) == pytest.approx(0.5)
    assert float(objectives.kl_estimate(torch.tensor(-4.0), 2)) == 0.0, "held at 0 or above, as TRL's clamp"
    losses, rewards = objectives.kto(p, r, desirable, kl, beta=0.1, desirable_weight=1.5, undesirable_weight=0.7)
    lr = p - r
    good, bad = 1.5 * (1 - torch.sigmoid(0.1 * (lr - 0.5))), 0.7 * (1 - torch.sigmoid(0.1 * (0.5 - lr)))
    want = torch.where(desirable, good, bad)
    assert torch.allclose(losses, want) and torch.allclose(rewards, 0.1 * lr)


def test_metrics_of_summed_micro_batches_equal_those_of_the_whole_batch():
    cfg = PreferenceConfig()
    logps = torch.stack([PC, PR], 1).reshape(-1)  # chosen 0, rejected 0, chosen 1, ...
    ref = torch.stack([RC, RR], 1).reshape(-1)
    counts = torch.stack([NC, NR], 1).reshape(-1)
    whole = objectives.item_losses("dpo", cfg, logps, counts, ref)[1]
    halves = [objectives.item_losses("dpo", cfg, logps[s], counts[s], ref[s])[1] for s in (slice(0, 6), slice(6, 12))]
    halves = halves[0] + halves[1]
    assert torch.allclose(whole, halves)
    m = objectives.metrics(whole)
    rc, rr = 0.1 * (PC - RC), 0.1 * (PR - RR)
    assert m["loss"] == pytest.approx(float(-F.logsigmoid(rc - rr).mean()))
    assert m["rewards_accuracy"] == pytest.approx(float((rc > rr).double().mean()))
    assert m["rewards_margin"] == pytest.approx(float((rc - rr).mean()))
    assert m["logps_chosen"] == pytest.approx(float(PC.mean()))
    assert m["logps_rejected"] == pytest.approx(float(PR.mean()))
    assert set(objectives.metrics(whole, prefix="eval_")) == {f"eval_{k}" for k in ("loss", *objectives.METRICS)}


def test_kto_metrics_split_by_label_and_accuracy_is_the_reward_s_sign():
    cfg = PreferenceConfig(beta=1.0)
    p, r = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-2.0, -4.0, -1.0])  # rewards +1, -1, -1
    desirable = torch.tensor([True, False, True])
    _, sums = objectives.item_losses("kto", cfg, p, torch.ones(3), r, desirable, 0.0)
    m = objectives.metrics(sums)
    assert m["rewards_chosen"] == pytest.approx(0.0) and m["rewards_rejected"] == pytest.approx(-1.0)
    assert m["rewards_accuracy"] == pytest.approx(2 / 3)  # rows 1 and 2 right, row 3 (desirable, made less likely) not
    only_good = objectives.metrics(objectives.item_losses("kto", cfg, p[:1], torch.ones(1), r[:1], desirable[:1])[1])
    assert "rewards_rejected" not in only_good and "rewards_margin" not in only_good
