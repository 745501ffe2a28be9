"""train.time_budget: the duration key, and the arithmetic that plans a run's length from given speeds (no clocks)."""

import pytest
import torch

from lorakit import budget, config, train
from lorakit.errors import LorakitError


def cfg_with(**train_keys) -> config.RunConfig:
    return config.validate({"data": {"train": "x.jsonl"}, "train": train_keys})


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("90s", 90), ("20m", 1200), ("1h", 3600), ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("2m30s", 150),
     (90, 90), (2.5, 2.5), ("45", 45)],
)  # fmt: skip
def test_a_duration_becomes_seconds(given, seconds):
    assert cfg_with(time_budget=given).train.time_budget == seconds


@pytest.mark.parametrize("bad", ["abc", "1h30", "20 minutes", "m", "", "-5m", 0, "0s", True])
def test_a_bad_duration_is_one_clear_message(bad):
    with pytest.raises(LorakitError, match=r"train\.time_budget: must be a (positive )?duration such as 90s, 20m"):
        cfg_with(time_budget=bad)


def test_the_budget_round_trips_through_config_yaml_and_refuses_max_steps(tmp_path):
    cfg = cfg_with(time_budget="20m", eval_every=5)
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg, "config.yaml holds seconds, which load again"
    with pytest.raises(LorakitError, match=r"train\.time_budget: time_budget and max_steps both set the run's length"):
        cfg_with(time_budget="20m", max_steps=100)


def test_the_most_steps_that_fit():
    # 100 s, 10 s spent, 2 s a step, 10 s kept for the end: (100 - 10 - 10) / 2 = 40 steps.
    assert budget.plan_steps(100, 10, 0, 2.0, reserve_s=10) == 40
    # 5 steps done: the same 40 in all, since the time spent already paid for them ...
    assert budget.plan_steps(100, 20, 5, 2.0, reserve_s=10) == 40
    # ... and a slower measured step means fewer.
    assert budget.plan_steps(100, 20, 5, 4.0, reserve_s=10) == 22


def test_evaluations_and_checkpoints_take_their_share():
    # 1 s a step, 100 s: 100 steps alone. An evaluation every 10 steps (and at the last) at 4 s each: n + 4 *
    # ceil(n / 10) <= 100 -> 71 steps and 8 evaluations (7 periodic, one at 71) = 103 > 100; 70: 70 + 28 = 98.
    assert budget.plan_steps(100, 0, 0, 1.0, eval_s=4, eval_every=10) == 70
    # No eval_every: one evaluation, at the end.
    assert budget.plan_steps(100, 0, 0, 1.0, eval_s=4) == 96
    # Checkpoints count the same way; both together.
    assert budget.plan_steps(100, 0, 0, 1.0, save_s=4, save_every=10) == 70
    assert budget.plan_steps(100, 0, 0, 1.0, eval_s=2, eval_every=10, save_s=2, save_every=10) == 70


def test_a_plan_before_step_11_counts_the_evaluations_after_step_10():
    # 10 steps done (the evaluation at 10 made), 50 s spent, 1 s a step, 5 s an evaluation every 10 steps. n = 40:
    # steps 11..40 (30 s) and evaluations at 20, 30, 40 (15 s): 95 s; 41 would add an evaluation at 41: 101 s.
    assert budget.plan_steps(100, 50, 10, 1.0, eval_s=5, eval_every=10) == 40
    assert budget._events(10, 40, 10) == 3 and budget._events(10, 41, 10) == 4
    assert budget._events(0, 1, 10) == 1 and budget._events(0, 10, 10) == 1 and budget._events(0, 10, None) == 1


def test_a_run_out_of_time_makes_one_step_more_as_its_last():
    # A plan comes before a step, whose rate the new schedule sets: that step is then the schedule's last.
    assert budget.plan_steps(100, 120, 7, 1.0) == 8
    assert budget.plan_steps(10, 0, 0, 60.0) == 1, "a new run makes at least one step"
    assert budget.plan_steps(100, 0, 0, 0.0) > 10**6, "an instant step is no division by zero"


def test_the_plan_re_runs_after_the_first_step_then_once_measured_then_at_checks():
    b = budget.Budget(seconds=60, started=0.0, step_tokens=100, eval_tokens=0, eval_every=None, save_every=None,
                     save_guess_s=0, best_guess_s=0, reserve_s=0)  # fmt: skip
    # Before step 2 (step 1's time), before step 7 (steps 2-6 measured): both before training the step named.
    assert [s for s in range(1, 10) if b.due(s, total=20)] == [2, 2 + budget.MEASURED_STEPS]
    assert [s for s in range(1, 5) if b.due(s, total=4)] == [2, 4], "before the planned last step, if sooner"
    b.final, b.planned_at = True, 6  # planned from measured speed after 6 steps: then checked as it goes
    assert next(s for s in range(7, 30) if b.due(s, total=20)) == 12, "MEASURED_STEPS on, at least"
    assert next(s for s in range(7, 300) if b.due(s, total=200)) == 27, "a tenth of the run on"
    assert b.due(9, total=9), "and before the planned last step, however soon: a run ahead of its plan lengthens it"
    b.planned_at = 0  # a resumed run whose checkpoint had planned from measured speed: it finishes that plan
    assert not any(b.due(s, total=20) for s in range(1, 30))


class Clock:
    """time.perf_counter, scripted: it moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def issue_budget(clock: Clock, **over) -> budget.Budget:
    """Issue 30's run: 60 s, 8 s kept for the end, an evaluation and a 1 s checkpoint every 10 steps, 27.32 times a
    step's tokens evaluated (3.17 s a step made that 43.3 s), and 0.3 s a step by setup's estimate."""
    keys = {"seconds": 60, "started": 0.0, "step_tokens": 100, "eval_tokens": 2732, "eval_every": 10, "save_every": 10,
            "save_guess_s": 1.0, "best_guess_s": 0.0, "reserve_s": 8.0, "guess_step_s": 0.3}  # fmt: skip
    return budget.Budget(**{**keys, **over}, clock=clock)


def test_a_plan_from_the_warm_up_step_neither_scales_the_evaluation_by_it_nor_ends_the_run():
    # plan_steps is right about what it was given: one more step and its evaluation (43.3 s) pass 60 s, so the run
    # makes that step as its last. What it was given was wrong: the evaluation scaled by the warm-up step.
    assert budget.plan_steps(60, 8, 1, 3.17, 8, 43.3, 10, 1, 10) == 2
    clock = Clock()
    b = issue_budget(clock)
    clock.now, b.durations = 8.0, [3.17]  # setup and step 1
    total, step_s = b.replan(1)
    assert step_s == 3.17 and not b.final, "planned from the warm-up step: never the last word"
    evaluation = 2732 / 100 * 0.3 / budget.EVAL_SPEEDUP  # 4.1 s: by setup's estimate of a step
    assert total == budget.plan_steps(60, 8, 1, 3.17, 8, evaluation, 10, 1, 10) == 11
    # A warm-up step so slow that no more fit by its pace: one step more all the same, whose time plans the end ...
    b.durations = [30.0]
    assert b.replan(1)[0] == 3 and budget.plan_steps(60, 8, 1, 30.0, 8, evaluation, 10, 1, 10) == 2
    clock.now = 52.0  # ... unless setup and that step left no time past the end's reserve
    assert b.replan(1)[0] == 2


def simulate(b: budget.Budget, clock: Clock, total: int, step_s, eval_s: float, save_s: float) -> list[tuple]:
    """A run as train.train makes it, on a scripted clock: each re-plan's (step, total); step_s(step) its time."""
    plans, step = [], 0
    while step < total:
        step += 1
        if b.due(step, total):
            total, _ = b.replan(step - 1)
            plans.append((step, total))
        clock.now += step_s(step)
        b.durations.append(step_s(step))
        for every, took, field in ((b.eval_every, eval_s, "eval_s"), (b.save_every, save_s, "save_s")):
            if step == total or step % every == 0:
                clock.now += took
                setattr(b, field, took)
    return plans


@pytest.mark.parametrize(("later_s", "least"), [(0.3, 45), (1.0, 15)])
def test_a_run_re_plans_from_its_measured_steps_and_ends_within_its_budget(later_s, least):
    """Issue 30's run (setup 4.83 s, step 1 3.17 s, checkpoints 1 s) planned 2 steps of its 60 s and used 13.5 s.
    Its later steps take a tenth of the first's time, or a third; an evaluation, 27.32 steps' tokens at half a trained
    token's cost (4.1 s, 13.7 s), more than setup's estimate guessed in the second case."""
    clock = Clock()
    b = issue_budget(clock)
    clock.now, eval_s = 4.83, 27.32 * later_s / budget.EVAL_SPEEDUP
    plans = simulate(b, clock, 2, lambda step: 3.17 if step == 1 else later_s, eval_s=eval_s, save_s=1.0)
    steps = plans[-1][1]
    assert plans[0] == (2, 11), "after step 1"
    assert plans[1][0] == 7, "after the next MEASURED_STEPS"
    assert all(step == total or step - 1 >= 7 for step, total in plans[2:]), plans
    assert steps >= least and 60 - 8 - (later_s + eval_s + 1.0) < clock.now <= 60 - 8, (steps, clock.now, plans)


def test_a_budget_below_the_run_s_fixed_costs_is_said():
    clock = Clock()
    b = issue_budget(clock, seconds=1.0, reserve_s=5.1)
    clock.now = 8.2  # setup alone
    assert budget.over_budget(b) == (
        "note: train.time_budget 1s is shorter than this run's fixed costs: setup took 8.2 s and the end needs about "
        "5.1 s (saving the result, the card, slack), which leaves no time to train; the run makes at least 2 steps "
        "all the same, and ends past its budget"
    )
    b.seconds, b.guess_step_s, clock.now = 10.0, 2.0, 3.0
    assert "which leaves 1.9 s, less than a step (about 2 s);" in budget.over_budget(b)
    b.guess_step_s = 1.5
    assert budget.over_budget(b) is None


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The rates of the next `steps` steps, as train_step reads them."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize(("planned", "replanned"), [(4, 10), (40, 10)])
def test_a_stretched_schedule_is_the_one_built_for_its_new_length(kind, planned, replanned):
    cfg = cfg_with(scheduler=kind, warmup_steps=2, lr=0.1)

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)

    opt = optimizer()
    sched = train.build_schedule(opt, cfg, planned)
    head = lrs(sched, opt, 3)  # three steps, then the run re-plans
    sched = train.stretch_schedule(sched, cfg, replanned, done=3)
    tail = lrs(sched, opt, replanned - 3)
    ref_opt = optimizer()
    reference = lrs(train.build_schedule(ref_opt, cfg, replanned), ref_opt, replanned)
    assert head == pytest.approx(reference[:3]), "warmup does not depend on the length"
    assert tail == pytest.approx(reference[3:]), "from the re-plan on, the schedule of the new length"
    assert tail[-1] < 0.25 * cfg.train.lr, "the decay ends at the last step, not cut off"
