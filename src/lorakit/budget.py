"""train.time_budget: how many steps a run makes to end within its budget, planned from the speed it measures.

A run plans its length from plan's speed estimate at setup, again from its first step's time, once more from the
speed measured over the steps after it, then at checks as that speed is measured over more steps (`plan_steps`, a
pure function of the times; train.replan applies each plan before a step and rebuilds the schedule for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from lorakit import checkpoint, plan
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder

# train.time_budget. Steps timed after a process's first (whose time counts warm-up: compiling, the allocator
# growing) before the run's length is planned from their speed.
MEASURED_STEPS = 5
CHECKS = 10  # how often a run re-plans from the pace it measured so far
EVAL_SPEEDUP = 2.0  # an evaluated token costs at most half a trained one (a forward pass, no backward)
WRITE_BYTES_PER_S = 200e6  # how fast weights are taken to be written until a checkpoint has been timed
FINISH_S = 5.0  # the end's fixed costs beyond writing the weights: tokenizer, loss plot, card, summary
SLACK = 0.05  # of the budget, left free for steps slower than the measured ones


@dataclass
class Budget:
    """train.time_budget: what planning the run's length needs (`plan`), and what this process measured so far."""

    seconds: float
    started: float  # time.perf_counter() when this process's setup began
    step_tokens: float  # input tokens of one optimizer step, all ranks, on average
    eval_tokens: int  # input tokens of one evaluation (0: no held-out data)
    eval_every: int | None
    save_every: int | None
    save_guess_s: float  # one checkpoint, until one is timed (0: the run saves none)
    best_guess_s: float  # keep_best writing the best weights, in an evaluation's time until one is timed
    reserve_s: float  # the end (saving the result, card, plot) and the slack
    offset: float = 0.0  # a resumed run: the loop time its earlier attempts spent
    first: int = 1  # the first step this process trains: its time includes warm-up
    final: bool = False  # planned from the speed measured after the first step (a resumed run keeps it)
    planned_at: int = 0  # steps done at the last plan or check, in the process that made the final plan (else 0)
    durations: list[float] = field(default_factory=list)  # seconds of each step this process trained
    eval_s: float | None = None  # the longest evaluation so far (keeping the best included)
    save_s: float | None = None  # the longest checkpoint so far

    def spent(self) -> float:
        return time.perf_counter() - self.started + self.offset

    def due(self, step: int, total: int) -> bool:
        """Whether to re-plan before training `step` (of `total` planned): after this process's first step (its time
        counts warm-up, so the plan is cautious), then MEASURED_STEPS later (or before the planned last step, if that
        comes sooner); then CHECKS times over the run, from the pace measured so far (not in a resumed run: it
        finishes its plan)."""
        done = step - 1
        if not self.final:
            return done == self.first or (done > self.first and (done == self.first + MEASURED_STEPS or step == total))
        return self.planned_at > 0 and step < total and done - self.planned_at >= max(MEASURED_STEPS, total // CHECKS)

    def plan(self, done: int, step_s: float) -> int:
        """The run's total steps after `done`, at `step_s` seconds a step (plan_steps; evaluations and checkpoints
        at their times measured so far, else guessed from the step's speed and the bytes they write)."""
        eval_guess = self.eval_tokens / max(self.step_tokens, 1) * step_s / EVAL_SPEEDUP + self.best_guess_s
        eval_s = self.eval_s if self.eval_s is not None else eval_guess if self.eval_tokens else 0.0
        save_s = self.save_s if self.save_s is not None else self.save_guess_s
        return plan_steps(self.seconds, self.spent(), done, step_s, self.reserve_s, eval_s, self.eval_every, save_s,
                          self.save_every)  # fmt: skip


def plan_steps(
    budget_s: float,
    spent_s: float,
    done: int,
    step_s: float,
    reserve_s: float = 0.0,
    eval_s: float = 0.0,
    eval_every: int | None = None,
    save_s: float = 0.0,
    save_every: int | None = None,
) -> int:
    """How many optimizer steps in all a run should make to end within `budget_s` seconds: the most whose training
    (step_s seconds each), evaluations (eval_s each, every eval_every steps and at the last) and checkpoints
    (save_s each, every save_every steps and at the last), plus `reserve_s` for the end, fit in what `spent_s`
    left. Pass eval_s 0 for a run that does not evaluate, save_s 0 for one that does not save.

    done: the steps trained so far, with their evaluations and checkpoints. Never fewer than done + 1: a run plans
    before a step, whose rate the plan's schedule sets, so a run out of time makes that one step more, as its last.
    """
    lo = done + 1

    def cost(n: int) -> float:  # grows with n: the evaluations and checkpoints up to n never get fewer
        events = eval_s * _events(done, n, eval_every) + save_s * _events(done, n, save_every)
        return spent_s + (n - done) * step_s + events + reserve_s

    left = budget_s - spent_s - reserve_s
    hi = max(lo, done + int(min(left / max(step_s, 1e-9), 1e9)))  # as many as training alone would fit
    if cost(lo) > budget_s:
        return lo
    while lo < hi:  # the largest n in [lo, hi] whose cost fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget_s else (lo, mid - 1)
    return lo


def _events(done: int, n: int, every: int | None) -> int:
    """Evaluations (or checkpoints) at steps done+1 .. n: at the multiples of `every`, and at the last."""
    periodic = n // every - done // every if every else 0
    return periodic + (0 if every and n % every == 0 else 1)


def start(cfg: RunConfig, accelerator: Accelerator, run: RunFolder, resume: bool, device: str,
                per_step: int, row_tokens: list[int], eval_tokens: int, trained: int,
                started: float) -> tuple[Budget, int]:  # fmt: skip
    """train.time_budget: the run's Budget and its first planned total steps. A resumed run's come from its
    checkpoint; a new run plans from plan's speed estimate for this machine, at least 2 steps (the second is planned
    from the first's time, whatever the estimate said; where plan cannot tell, so is the rest). All ranks take the
    main rank's plan: each timed its own clock."""
    t = cfg.train
    saves = bool(t.save_every or t.keep_best)
    budget = Budget(
        seconds=t.time_budget, started=started, step_tokens=per_step * sum(row_tokens) / max(len(row_tokens), 1),
        eval_tokens=eval_tokens, eval_every=t.eval_every, save_every=t.save_every,
        # A checkpoint: the trained weights (fp32), AdamW's two moments, and a LoRA run's adapter again.
        save_guess_s=(1 + 16 * trained / WRITE_BYTES_PER_S) if saves else 0.0,
        best_guess_s=4 * trained / WRITE_BYTES_PER_S if t.keep_best else 0.0,
        reserve_s=FINISH_S + 4 * trained / WRITE_BYTES_PER_S + SLACK * t.time_budget,
    )  # fmt: skip
    newest = checkpoint.latest(run.checkpoints) if resume else None
    saved = checkpoint.read_state(newest) if newest else {}
    if "planned_steps" in saved:
        budget.offset, budget.first, budget.final = saved["elapsed"], saved["step"] + 1, saved["budget_final"]
        return budget, saved["planned_steps"]
    speed = planned_speed(cfg, device, accelerator.num_processes)
    total = max(2, budget.plan(0, budget.step_tokens / speed)) if speed else 2
    return budget, agree(accelerator, total)


def planned_speed(cfg: RunConfig, device: str, nproc: int) -> float | None:
    """plan's estimate of this run's training tokens a second here (all processes), or None where it cannot tell."""
    try:
        shape = plan.load_shape(cfg.model)
    except LorakitError:
        return None
    this = plan.here(device, nproc, seconds=0.05)
    return plan.fit(shape, plan.setup_of(cfg, this.kind, nproc), this)["tokens_per_s"] or None


def agree(accelerator: Accelerator, n: int) -> int:
    """The main rank's `n` on every rank (a collective: all ranks call it at the same point)."""
    if accelerator.num_processes == 1:
        return n
    return int(broadcast(torch.tensor([n], device=accelerator.device), from_process=0).item())


def line(seconds: float, total: int, per_step: int, n_rows: int) -> str:
    return f"{duration(seconds)} time budget: {total} steps, {epochs(total, per_step, n_rows):.2f} epochs"


def epochs(steps: int, per_step: int, n_rows: int) -> float:
    """The passes over `n_rows` rows that `steps` steps of `per_step` rows make (train.DataOrder's stream)."""
    return steps * per_step / n_rows


def duration(seconds: float) -> str:
    """90 -> 1m30s: a time budget as a config would write it."""
    h, rest = divmod(round(seconds), 3600)
    parts = [f"{v}{unit}" for v, unit in ((h, "h"), (rest // 60, "m"), (rest % 60, "s")) if v]
    return "".join(parts) or f"{seconds:g}s"
