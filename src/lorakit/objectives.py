"""The preference losses (DPO, ORPO, KTO) and the reward metrics a preference run is judged by, as pure functions.

Their math is TRL 1.16's (trl/trainer/dpo_trainer.py, trl/experimental/orpo/orpo_trainer.py,
trl/trainer/kto_trainer.py), from the summed log-probabilities of each answer's trained tokens (loss.sequence_logps)
under the policy and under the reference (reference.py, computed once before training). Where lorakit differs:
- DPO with label_smoothing is conservative DPO (cDPO: the share of pairs assumed mislabelled), the form TRL's
  `sigmoid` loss had before 1.0; with none it is TRL 1.16's `sigmoid`.
- ORPO's NLL is the chosen answer's mean per-token loss (the ORPO paper's L_SFT, on the answer only, as lorakit's SFT
  trains the answers only); TRL's runs over the prompt's tokens too.
- KTO's KL estimate is over a whole optimizer step (all micro-batches, all ranks), so that grad-accum is exact;
  TRL's is over one micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.config import PreferenceConfig

# What each step (and each evaluation) sums, in this order, to be reduced over micro-batches and ranks at once:
# the loss, the items (pairs, or KTO rows) it averages over, the rewards and log-probs of the chosen (desirable) and
# rejected (undesirable) answers with their counts, and the items whose reward ranks them right.
SUMS = (
    "loss",
    "items",
    "rewards_chosen",
    "logps_chosen",
    "chosen",
    "rewards_rejected",
    "logps_rejected",
    "rejected",
    "correct",
)
# The metrics of metrics.jsonl (eval_ in front at an evaluation), as TRL names them with _ for /.
METRICS = (
    "rewards_chosen",
    "rewards_rejected",
    "rewards_accuracy",
    "rewards_margin",
    "logps_chosen",
    "logps_rejected",
)


def dpo(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    nc: torch.Tensor | None = None,
    nr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss of each pair (P,), and the rewards of its chosen and rejected answers (P,), detached.

    pc, pr: the policy's summed log-probs of the chosen and rejected answers (P,); rc, rr: the reference's. nc, nr:
    their trained tokens (P,), which `ipo` averages over (as TRL 1.16, with its authors: the squared loss would
    otherwise grow with the answers' length).
    """
    chosen, rejected = pc - rc, pr - rr
    if loss == "ipo":
        assert nc is not None and nr is not None, "ipo averages over the answers' tokens"
        delta = chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss == "sigmoid":
        delta = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo(
    pc_mean: torch.Tensor, pr_mean: torch.Tensor, nll_chosen: torch.Tensor, orpo_lambda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's loss of each pair (P,): the chosen answer's NLL minus lambda x log sigmoid of the log odds ratio; and the
    rewards (lambda x the mean log-probs, as TRL logs them), detached.

    pc_mean, pr_mean: the policy's mean per-token log-probs of the chosen and rejected answers (P,); nll_chosen: the
    chosen answer's mean per-token loss (P,). No reference: ORPO needs none.
    """
    # log(1 - p) of a probability that rounds to 1 (a mean log-prob of exactly 0) would be -inf: kept just below.
    pc_mean, pr_mean = pc_mean.clamp(max=-1e-12), pr_mean.clamp(max=-1e-12)
    log_odds = (pc_mean - pr_mean) - (_log1mexp(pc_mean) - _log1mexp(pr_mean))
    losses = nll_chosen - orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * pc_mean.detach(), orpo_lambda * pr_mean.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (TRL's branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def kto(
    p: torch.Tensor,
    r: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's loss of each row (R,) (weighted: TRL averages the weighted losses over the rows), and its reward
    (R,), detached.

    p, r: the policy's and the reference's summed log-probs of each row's answer (R,); desirable: its label (R,) bool;
    kl: the KL estimate (`kl_estimate`), a constant of the step.
    """
    logratio = p - r
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad), beta * logratio.detach()


def kl_estimate(diff_sum: torch.Tensor | float, count: torch.Tensor | float) -> torch.Tensor:
    """KTO's estimate of KL(policy || reference): the mean of log pi(y'|x) - log ref(y'|x) over mismatched pairs
    (each prompt with another row's answer), held at 0 or above; no gradient flows through it."""
    return torch.as_tensor(diff_sum / max(float(count), 1.0)).detach().clamp(min=0)


def pair_sums(
    losses: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """SUMS of a batch of pairs: losses, chosen and rejected rewards and log-probs, each (P,)."""
    n = float(len(losses))
    out = [losses.sum(), n, rc.sum(), lc.sum(), n, rr.sum(), lr.sum(), n, (rc > rr).sum()]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=losses.device) for v in _detached(out)])


def kto_sums(losses: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """SUMS of a batch of KTO rows. A row counts as ranked right when its reward has its label's sign (a desirable
    answer made likelier than the reference makes it, an undesirable one less likely)."""
    good, bad = desirable, ~desirable
    right = torch.where(desirable, rewards > 0, rewards < 0).sum()
    out = [losses.sum(), float(len(losses)), rewards[good].sum(), logps[good].sum(), good.sum(), rewards[bad].sum(),
           logps[bad].sum(), bad.sum(), right]  # fmt: skip
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=losses.device) for v in _detached(out)])


def _detached(values: list) -> list:
    return [v.detach() if isinstance(v, torch.Tensor) else v for v in values]


def metrics(sums: torch.Tensor | list[float], prefix: str = "") -> dict[str, float]:
    """The metrics of summed SUMS (over a step's micro-batches and ranks, or an evaluation): the mean loss per item,
    mean rewards and log-probs, the share ranked right (reward accuracy) and the margin. A side with no answers
    (a KTO step of desirable rows only) has none of its means."""
    s = dict(zip(SUMS, (float(v) for v in sums)))
    out = {f"{prefix}loss": s["loss"] / max(s["items"], 1)}
    for side in ("chosen", "rejected"):
        if s[side]:
            out[f"{prefix}rewards_{side}"] = s[f"rewards_{side}"] / s[side]
            out[f"{prefix}logps_{side}"] = s[f"logps_{side}"] / s[side]
    out[f"{prefix}rewards_accuracy"] = s["correct"] / max(s["items"], 1)
    if s["chosen"] and s["rejected"]:
        out[f"{prefix}rewards_margin"] = out[f"{prefix}rewards_chosen"] - out[f"{prefix}rewards_rejected"]
    return out


def item_losses(
    objective: str,
    settings: PreferenceConfig,
    logps: torch.Tensor,
    counts: torch.Tensor,
    ref: torch.Tensor | None,
    desirable: torch.Tensor | None = None,
    kl: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each item of a micro-batch (P,) and the batch's SUMS, from its sequences' log-probs.

    Pairs (dpo, orpo): logps and counts (2P,) as loss.sequence_logps gives them for sequences chosen 0, rejected 0,
    chosen 1, ...; ref (2P,) the reference's log-probs in that order (None for orpo). KTO: logps, counts, ref (R,),
    desirable (R,) bool and the step's kl.
    """
    s = settings
    if objective == "kto":
        losses, rewards = kto(logps, ref, desirable, kl, s.beta, s.desirable_weight, s.undesirable_weight)
        return losses, kto_sums(losses, rewards, logps, desirable)
    pc, pr, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
    if objective == "dpo":
        losses, rc, rr = dpo(pc, pr, ref[0::2], ref[1::2], s.beta, s.loss, s.label_smoothing, nc, nr)
        return losses, pair_sums(losses, rc, rr, pc, pr)
    if objective == "orpo":
        pc_mean, pr_mean = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        losses, rc, rr = orpo(pc_mean, pr_mean, -pc_mean, s.orpo_lambda)
        # TRL's ORPO logs the mean log-probs its rewards are made of.
        return losses, pair_sums(losses, rc, rr, pc_mean, pr_mean)
    raise ValueError(f"unknown preference objective {objective!r}")
