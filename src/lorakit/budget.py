"""train.time_budget: how many steps a run makes to end within its budget, planned from the speed it measures.

A run plans its length from plan's speed estimate at setup, again from its first step's time (never the last word:
that step counts warm-up), once more from the speed measured over the steps after it, then at checks as that speed
is measured over more steps, and before its planned last step (`plan_steps`, a pure function of the times;
Budget.replan picks what it plans from; train.replan applies each plan before a step and rebuilds the schedule).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from lorakit import checkpoint, plan
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder, latest

# train.time_budget. Steps timed after a process's first (whose time counts warm-up: compiling, the allocator
# growing) before the run's length is planned from their speed.
MEASURED_STEPS = 5
CHECKS = 10  # how often a run re-plans from the pace it measured so far
EVAL_SPEEDUP = 2.0  # an evaluated token costs at most half a trained one (a forward pass, no backward)
WRITE_BYTES_PER_S = 200e6  # how fast weights are taken to be written until a checkpoint has been timed
FINISH_S = 5.0  # the end's fixed costs beyond writing the weights: tokenizer, loss plot, card, summary
SLACK = 0.05  # of the budget, left free for steps slower than the measured ones
MIN_STEPS = 2  # a new run's least: the second is planned from the first's time, whatever setup's estimate said


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
    guess_step_s: float = 0.0  # a step's seconds by plan's estimate at setup (0: plan cannot tell, or a resumed run)
    offset: float = 0.0  # a resumed run: the loop time its earlier attempts spent
    first: int = 1  # the first step this process trains: its time includes warm-up
    final: bool = False  # planned from the speed measured after the first step (a resumed run keeps it)
    planned_at: int = 0  # steps done at the last plan or check, in the process that made the final plan (else 0)
    durations: list[float] = field(default_factory=list)  # seconds of each step this process trained
    eval_s: float | None = None  # the longest evaluation so far (keeping the best included)
    save_s: float | None = None  # the longest checkpoint so far
    clock: Callable[[], float] = time.perf_counter  # what `started` was read from (tests script it)

    def spent(self) -> float:
        return self.clock() - self.started + self.offset

    def due(self, step: int, total: int) -> bool:
        """Whether to re-plan before training `step` (of `total` planned): after this process's first step (its time
        counts warm-up, so the plan is cautious), then MEASURED_STEPS later or before the planned last step, if that
        comes sooner; then CHECKS times over the run, from the pace measured so far, and before the planned last
        step, where a run ahead of its plan lengthens it (not in a resumed run: it finishes its checkpoint's plan)."""
        done = step - 1
        if not self.final:
            return done == self.first or (done > self.first and (done == self.first + MEASURED_STEPS or step == total))
        if self.planned_at == 0:
            return False
        return step == total or done - self.planned_at >= max(MEASURED_STEPS, total // CHECKS)

    def replan(self, done: int) -> tuple[int, float]:
        """Before step done+1: the run's total steps, and the seconds a step they were planned from.

        After this process's first step, from that step's time alone: cautious, since it counts warm-up, and never
        the last word: while time is left it plans at least one step more than the next, so that a measured step
        plans the run's end. Then, and at each check, from the mean of every step after the first. Not from the
        steps since the last check: steps vary with their rows' lengths (WikiSQL, 8 rows: 3.6-5.2 s), and one slow
        window had cut a 29-step plan to 25, ending the run at 102 s of a 122 s budget. The time left is the clock's,
        so a pace that slows for good still lowers each later plan, and the slack absorbs the lag."""
        warm_up = done == self.first
        step_s = self.durations[0] if warm_up else statistics.mean(self.durations[1:])  # durations[0]: step first
        # An evaluation is no warm-up step's multiple: scaled by one (3.17 s where later steps took a tenth of it), a
        # 43 s evaluation guess left a 60 s budget 2 steps. Setup's estimate of a step scales it until steps are timed
        # (where plan cannot tell, nothing does: this plan is re-made from measured steps before the run can end).
        total = self.plan(done, step_s, self.guess_step_s if warm_up else step_s)
        if warm_up and self.spent() + self.reserve_s < self.seconds:
            total = max(total, done + 2)
        self.final, self.planned_at = not warm_up, 0 if warm_up else done
        return total, step_s

    def plan(self, done: int, step_s: float, eval_step_s: float) -> int:
        """The run's total steps after `done`, at `step_s` seconds a step (plan_steps; evaluations and checkpoints
        at their times measured so far, else guessed: an evaluation from `eval_step_s` seconds a step of its
        tokens, a checkpoint from the bytes it writes)."""
        eval_guess = self.eval_tokens / max(self.step_tokens, 1) * eval_step_s / EVAL_SPEEDUP + self.best_guess_s
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
    checkpoint; a new run plans from plan's speed estimate for this machine, at least MIN_STEPS (where plan cannot
    tell, MIN_STEPS: the rest is planned from the first's time), and says so where the budget cannot pay the run's
    fixed costs. All ranks take the main rank's plan: each timed its own clock."""
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
    newest = latest(run.checkpoints) if resume else None
    saved = checkpoint.read_state(newest) if newest else {}
    if "planned_steps" in saved:
        budget.offset, budget.first, budget.final = saved["elapsed"], saved["step"] + 1, saved["budget_final"]
        return budget, saved["planned_steps"]
    speed = planned_speed(cfg, device, accelerator.num_processes)
    budget.guess_step_s = budget.step_tokens / speed if speed else 0.0
    total = max(MIN_STEPS, budget.plan(0, budget.guess_step_s, budget.guess_step_s)) if speed else MIN_STEPS
    if note := over_budget(budget):
        accelerator.print(note)
    return budget, agree(accelerator, total)


def over_budget(budget: Budget) -> str | None:
    """A note where the budget cannot pay a new run's fixed costs: the setup it spent, the end it keeps time for and
    one step (by setup's estimate, where plan can tell); None where it can."""
    setup, step_s = budget.spent(), budget.guess_step_s
    if setup + budget.reserve_s + step_s <= budget.seconds:
        return None
    left = budget.seconds - setup - budget.reserve_s
    return (
        f"note: train.time_budget {duration(budget.seconds)} is shorter than this run's fixed costs: setup took "
        f"{setup:.1f} s and the end needs about {budget.reserve_s:.1f} s (saving the result, the card, slack), which "
        + (f"leaves {left:.1f} s, less than a step (about {step_s:.2g} s)" if left > 0 else "leaves no time to train")
        + f"; the run makes at least {MIN_STEPS} steps all the same, and ends past its budget"
    )


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
