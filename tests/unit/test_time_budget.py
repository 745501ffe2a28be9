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
    assert not b.due(20, total=20), "never before the last step: its rate is set"
    b.planned_at = 0  # a resumed run whose checkpoint had planned from measured speed: it finishes that plan
    assert not any(b.due(s, total=20) for s in range(1, 30))


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
