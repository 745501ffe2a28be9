"""`lorakit eval` on preference data: how each model ranks the held-out pairs' answers.

For the base and every adapter, three numbers beside the generation comparison:
- preference accuracy: the share of pairs whose chosen answer the model finds likelier than the rejected one (summed
  log-probs of the answers' tokens, as DPO compares them);
- reward accuracy: the share whose chosen answer gained more log-probability over the reference than the rejected
  one, i.e. DPO's reward beta x (log p - log p_ref) ranks them right, as training's rewards_accuracy; for KTO rows,
  the share whose reward has its label's sign;
- reward margin: the mean reward of the chosen (desirable) answers less that of the rejected (undesirable) ones.
The reference is what a DPO run compares with: the base, or the run's adapter.init. The reference itself (the base,
or an adapter compared from adapter.init's folder) has no reward accuracy (its margins are zero): only its plain
preference accuracy is shown.

The pairs are tokenized as training tokenizes them (the run's chat template, data.max_length, max_prompt_length)
and scored like training's reference pass (reference.log_probs), so the numbers are those a run would log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from lorakit import data, model, objectives, preference_train, reference, sources
from lorakit import preference as preference_data
from lorakit.config import PreferenceConfig, RunConfig
from lorakit.errors import LorakitError

# What the columns mean, by what is scored: eval.json's `preference` block, the page and the table's footer say it.
EXPLAINED = {
    "pairs": "preference_accuracy: share of pairs whose chosen answer has the higher log-probability; "
    "reward_accuracy: share of pairs whose chosen answer gained more log-probability over the reference than the "
    "rejected one; reward_margin: mean of beta x that difference",
    "rows": "reward_accuracy: share of rows whose log-probability over the reference has the sign of their label; "
    "reward_margin: mean reward (beta x log-prob over the reference) of the desirable rows less the undesirable "
    "ones'",
}


@dataclass
class Pairs:
    """The held-out items (preference_train.items) and the reference's log-probs of their two scored sequences."""

    objective: str
    items: list[dict]
    reference: str  # what the rewards are measured against, in words: "base" or "adapter.init: PATH"
    reference_logps: torch.Tensor | None  # (items, 2) (KTO: 1), once evaluate.reference_pass has scored them
    beta: float
    batch_size: int
    pad: int
    accelerator: Accelerator
    reference_folder: Path | None = None  # adapter.init's adapter folder, resolved; None: the base is the reference

    def is_reference(self, folder: Path | None) -> bool:
        """Whether the model at `folder` (an adapter or model folder; None: the base) is the reference."""
        if self.reference_folder is None:
            return folder is None
        return folder is not None and Path(folder).resolve() == self.reference_folder


def objective_of(cfg: RunConfig, path: str | None) -> str:
    """The run's objective; for an sft run given a --data file of preference rows, the objective that reads them
    (dpo for pairs, kto for labelled rows), so that eval ranks their answers instead of refusing the file."""
    if cfg.objective != "sft" or path is None:
        return cfg.objective
    rows = sources.read(path, cfg.data.split, limit=1)
    form = preference_data.detect(rows.records[0]) if rows.records else None
    if form is None:
        return "sft"
    return "dpo" if form in preference_data.PAIR_FORMS else "kto"


def held_out(
    cfg: RunConfig, objective: str, path: str | None, limit: int | None, batch_size: int, device: str
) -> Pairs:
    """The held-out pairs (or KTO rows; the first `limit`) of `path` or data.eval, tokenized as training tokenizes
    them (the run's tokenizer and chat template, data.max_length, max_prompt_length); no reference scored yet."""
    tokenizer = model.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    settings = cfg.preference or PreferenceConfig()
    ds = data.held_out_preference(cfg.data, tokenizer, objective, settings, path, limit)
    items = preference_train.items(ds, objective, cfg.data.max_length)
    if not items:
        raise LorakitError(
            f"no held-out {'pair' if preference_data.is_pairs(objective) else 'row'} fits data.max_length "
            f"({cfg.data.max_length}) with its answers: raise data.max_length"
        )
    # One process and no mixed precision: eval loaded the model in its dtype on its device already.
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no")
    return Pairs(objective, items, "base", None, settings.beta, batch_size, tokenizer.pad_token_id, accelerator)


def log_probs(pairs: Pairs, net: Any) -> torch.Tensor:
    """The summed log-probs (items, 2) of each item's two scored sequences under `net` as it is now (the adapter
    made active), as training's reference pass scores them; each sequence a row, padded as eval's held-out loss.
    KTO rows: their answers only, (items, 1): the KL sequences weigh only in training's loss."""
    items = pairs.items if pairs.objective != "kto" else [{**it, "scored": it["scored"][:1]} for it in pairs.items]
    return reference.log_probs(net, items, pairs.batch_size, pairs.pad, False, False, pairs.accelerator)


def scores(pairs: Pairs, logps: torch.Tensor, is_reference: bool) -> dict[str, float | None]:
    """One model's preference_accuracy, reward_accuracy and reward_margin from its log-probs (items, 2; KTO's
    (items, 1), as log_probs scores them).
    is_reference: the model is the reference itself, whose rewards are all zero: no reward accuracy or margin."""
    ref = pairs.reference_logps
    if pairs.objective == "kto":  # each row's answer, the one column log_probs scores for KTO
        desirable = torch.tensor([it["desirable"] for it in pairs.items])
        losses, rewards = objectives.kto(logps[:, 0], ref[:, 0], desirable, 0.0, pairs.beta)
        rewarded = objectives.metrics(objectives.kto_sums(losses, rewards, logps[:, 0], desirable))
        plain = None  # unpaired rows: no answer to prefer over another
    else:
        rewarded = _pair_metrics(logps, ref, pairs.beta)
        # Plain preference: the same ranking against a reference that gives every answer log-prob zero.
        plain = _pair_metrics(logps, torch.zeros_like(ref), pairs.beta)["rewards_accuracy"]
    return {
        "preference_accuracy": plain,
        "reward_accuracy": None if is_reference else rewarded["rewards_accuracy"],
        "reward_margin": None if is_reference else rewarded.get("rewards_margin"),
    }


def _pair_metrics(logps: torch.Tensor, ref: torch.Tensor, beta: float) -> dict[str, float]:
    pc, pr = logps[:, 0], logps[:, 1]
    losses, chosen, rejected = objectives.dpo(pc, pr, ref[:, 0], ref[:, 1], beta)
    return objectives.metrics(objectives.pair_sums(losses, chosen, rejected, pc, pr))


def summary(pairs: Pairs) -> dict[str, Any]:
    """eval.json's `preference` block: what the columns were computed on and against."""
    unit = "pairs" if preference_data.is_pairs(pairs.objective) else "rows"
    return {
        "objective": pairs.objective,
        unit: len(pairs.items),
        "reference": pairs.reference,
        "beta": pairs.beta,
        "explained": f"{EXPLAINED[unit]}. Reference: {pairs.reference}.",
    }
