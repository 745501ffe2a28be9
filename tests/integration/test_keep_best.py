"""train.keep_best and train.time_budget on tiny local runs.

keep_best: adapter/ (model/) holds the best evaluation's weights, the summary and card name its step, the newest
checkpoint the last weights, and a resumed run keeps the best. The evaluations' losses are scripted (training and
checkpoints are real): which step of a tiny run evaluates lowest is the CPU's arithmetic (a 2-core AMD EPYC found
step 14 where this suite had assumed at most 12), and what is under test is keeping the best, not the model's
learning. time_budget: the plan's plumbing (the schedule rebuilt for each new length, the summary, a resume that
finishes the planned steps) with plan_steps scripted, so that nothing depends on this machine's speed; plan_steps'
own arithmetic is tests/unit/test_time_budget.py's.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_config
from transformers import AutoModelForCausalLM

from lorakit import budget, config, train
from lorakit.errors import LorakitError
from tiny import save_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), arch="llama")


def script_evals(monkeypatch, losses: dict[int, float], steps: range) -> None:
    """train.eval_loss answering losses[s] for each step s of `steps` in turn (the evaluations a run makes)."""
    answers = iter([losses[s] for s in steps])
    monkeypatch.setattr(train, "eval_loss", lambda *a, **k: next(answers))


# Evaluated every 2 steps: the best at step 8; step 4's loss comes again at 10 (a tie is no new best) and every later
# one is worse, the last too.
LOSSES = {2: 3.0, 4: 2.5, 6: 2.6, 8: 2.0, 10: 2.5, 12: 2.2, 14: 2.1, 16: 2.4}


def evals(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def keep_best_config(tmp_path: Path, base: Path, out: str, **over) -> config.RunConfig:
    keys = {
        "train.lr": 0.05,
        "train.max_steps": 16,
        "train.eval_every": 2,
        "train.keep_best": "eval_loss",
        "train.save_every": 2,
        "train.keep_checkpoints": 8,
    }
    return make_config(tmp_path, base, output_dir=str(tmp_path / out), **{**keys, **over})


def test_the_published_adapter_is_the_best_evaluation_and_the_last_weights_stay_in_the_newest_checkpoint(
    tmp_path, llama, monkeypatch
):
    script_evals(monkeypatch, LOSSES, range(2, 17, 2))
    result = train.run(keep_best_config(tmp_path, llama, "run"), progress=False)
    run = tmp_path / "run"
    losses, best = evals(run), 8
    assert losses == LOSSES
    s = result.summary
    assert (s["keep_best"], s["best_step"], s["best_eval_loss"]) == ("eval_loss", best, losses[best])
    assert s["final_eval_loss"] == losses[16], "final_eval_loss stays the last evaluation's"
    assert json.loads((run / "summary.json").read_text()) == s
    published = load_file(run / "adapter" / "adapter_model.safetensors")
    at_best = load_file(run / "checkpoints" / f"step-{best:07d}" / "adapter" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "step-0000016" / "adapter" / "adapter_model.safetensors")
    assert published.keys() == at_best.keys() == last.keys()
    assert all(torch.equal(published[k], at_best[k]) for k in published), "adapter/ holds the best step's weights"
    assert not all(torch.equal(published[k], last[k]) for k in published)
    # The newest checkpoint holds the last weights: those --resume continues from (and the model in memory).
    trained = load_file(run / "checkpoints" / "step-0000016" / "trainable.safetensors")
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in trained.items())
    card = (run / "adapter" / "README.md").read_text()
    assert f"| published weights | step {best} of 16, the best eval_loss ({losses[best]:.4g})" in card


def test_a_resumed_run_keeps_the_best_of_the_steps_before_it(tmp_path, llama, monkeypatch):
    """Trained to step 12, then resumed to 16 (max_steps may grow on --resume): the same best as one straight run,
    step 8's, which the resumed steps 14 and 16 do not beat. No save_every: with keep_best the last step is
    checkpointed all the same."""
    over = {"train.save_every": None}
    script_evals(monkeypatch, LOSSES, range(2, 17, 2))
    straight = train.run(keep_best_config(tmp_path, llama, "straight", **over), progress=False).summary
    script_evals(monkeypatch, LOSSES, range(2, 13, 2))
    train.run(keep_best_config(tmp_path, llama, "resumed", **over, **{"train.max_steps": 12}), progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "best" / "best.json").is_file()
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000012").is_dir()
    script_evals(monkeypatch, LOSSES, range(14, 17, 2))
    resumed = train.run(keep_best_config(tmp_path, llama, "resumed", **over), resume=True, progress=False).summary
    assert (straight["best_step"], straight["best_eval_loss"]) == (8, 2.0)
    assert (resumed["best_step"], resumed["best_eval_loss"]) == (8, 2.0)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, llama, monkeypatch):
    """--resume of a run with no step left trains and evaluates nothing: summary.json keeps its last evaluation
    (it was rewritten with final_eval_loss null) and its best."""
    script_evals(monkeypatch, {2: 2.0, 4: 3.0}, range(2, 5, 2))
    cfg = keep_best_config(tmp_path, llama, "run", **{"train.max_steps": 4})
    first = train.run(cfg, progress=False).summary
    assert (first["final_eval_loss"], first["best_step"], first["best_eval_loss"]) == (3.0, 2, 2.0)
    monkeypatch.setattr(train, "eval_loss", lambda *a, **k: pytest.fail("a finished run evaluates nothing more"))
    again = train.run(cfg, resume=True, progress=False).summary
    assert (again["steps"], again["final_eval_loss"], again["best_step"], again["best_eval_loss"]) == (4, 3.0, 2, 2.0)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == again


def test_keep_best_of_a_full_fine_tune_with_tied_embeddings(tmp_path, monkeypatch):
    """Full fine-tuning keeps its best on disk as it happens. Qwen2's head is its embedding matrix under two names:
    both must be the best's. The evaluations are scripted: only what is kept matters here."""
    qwen = save_tiny(tmp_path / "qwen2", arch="qwen2")
    scripted = iter([3.0, 2.0, 2.5, 2.6])  # steps 2, 4, 6, 8: the best is step 4
    monkeypatch.setattr(train, "eval_loss", lambda *a, **k: next(scripted))
    cfg = make_config(tmp_path, qwen, method="full", **{"train.lr": 3e-3, "train.max_steps": 8, "train.eval_every": 2,
                                                        "train.keep_best": "eval_loss", "train.save_every": 2,
                                                        "train.keep_checkpoints": 4})  # fmt: skip
    summary = train.run(cfg, progress=False).summary
    assert (summary["best_step"], summary["best_eval_loss"]) == (4, 2.0)
    run = tmp_path / "run"
    at_best = load_file(run / "checkpoints" / "step-0000004" / "trainable.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    assert saved.get_output_embeddings().weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    params = dict(saved.named_parameters())
    assert at_best.keys() == params.keys()
    assert all(torch.equal(params[k], v) for k, v in at_best.items()), "model/ holds step 4's weights"
    last = load_file(run / "checkpoints" / "step-0000008" / "trainable.safetensors")
    assert not torch.equal(last["model.embed_tokens.weight"], at_best["model.embed_tokens.weight"])


def test_keep_best_needs_held_out_data_and_evaluations(tmp_path, llama):
    with pytest.raises(LorakitError) as none:
        make_config(tmp_path, llama, **{"data.eval": None, "train.eval_every": 2, "train.keep_best": "eval_loss"})
    # Labelled with its key and value, as a key's own check is; it was "(top level)" and the whole config.
    assert str(none.value).splitlines()[1:] == [
        "  train.keep_best: eval_loss is measured on held-out data and there is none: set data.eval (a file, or a "
        'fraction such as 0.1 of the train rows), or remove train.keep_best (got "eval_loss")'
    ]
    with pytest.raises(LorakitError, match=r"train.keep_best: keep_best picks among the run's evaluations"):
        make_config(tmp_path, llama, **{"train.keep_best": "eval_loss"})
    with pytest.raises(LorakitError, match=r"train.keep_best: Input should be 'eval_loss'"):
        make_config(tmp_path, llama, **{"train.eval_every": 2, "train.keep_best": "accuracy"})


def script_plan(monkeypatch, answers: dict[int, int]) -> list[int]:
    """plan_steps answering by the steps done (`answers`); returns the `done` of each call."""
    calls: list[int] = []

    def planned(budget_s, spent_s, done, step_s, *rest):
        calls.append(done)
        return answers[done]

    monkeypatch.setattr(budget, "plan_steps", planned)
    return calls


def budget_config(tmp_path: Path, base: Path, out: str) -> config.RunConfig:
    keys = {"train.max_steps": None, "train.time_budget": "10m", "train.scheduler": "cosine",
            "train.warmup_steps": 2, "train.save_every": 2, "train.eval_every": 3}  # fmt: skip
    return make_config(tmp_path, base, output_dir=str(tmp_path / out), **keys)


def schedule(cfg: config.RunConfig, total: int) -> list[float]:
    """The rate of each step of a `total`-step run of `cfg`, as train_step logs it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched, out = train.build_schedule(opt, cfg, total), []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_a_time_budget_sets_the_steps_and_fits_the_schedule_to_them(tmp_path, llama, monkeypatch, capsys):
    # By the steps done when it plans: setup 3 steps; after step 1 (its time) 4; after step 3 (the planned last step
    # came before step 7; steps 2-3 measured) 12; the check 5 steps later finds the run behind its plan: 10; the
    # check before that last step keeps it.
    calls = script_plan(monkeypatch, {0: 3, 1: 4, 3: 12, 8: 10, 9: 10})
    cfg = budget_config(tmp_path, llama, "run")
    summary = train.run(cfg, progress=False).summary
    assert calls == [0, 1, 3, 8, 9]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    lr = [r["lr"] for r in records]
    assert lr[1:3] == pytest.approx(schedule(cfg, 4)[1:3]), "re-planned to 4 before step 2"
    assert lr[3:8] == pytest.approx(schedule(cfg, 12)[3:8]), "then to 12 before step 4"
    assert lr[8:] == pytest.approx(schedule(cfg, 10)[8:]), "then shortened to 10 before step 9: its last rates"
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 9, 10], "the cadence, and the planned end"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000008", "step-0000010"]
    epochs = round(10 * cfg.train.batch_size / summary["rows"], 3)
    assert (summary["steps"], summary["planned_steps"], summary["time_budget_s"], summary["epochs"]) == (
        10, 10, 600.0, epochs
    )  # fmt: skip
    out = capsys.readouterr().out
    assert f"10m time budget: 12 steps, {12 * cfg.train.batch_size / summary['rows']:.2f} epochs, planned from" in out
    assert "10m time budget: 10 steps" in out and "shortened: planned from" in out
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"| steps / epochs | 10 / {epochs} |" in card and "| time budget | 600 s: 10 steps planned, " in card
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert (state["planned_steps"], state["budget_final"]) == (12, True), "what a resume from step 8 would finish"


def test_a_run_ahead_of_its_plan_is_lengthened_at_a_check(tmp_path, llama, monkeypatch, capsys):
    # Planned to 10 after steps 2-3; the check 5 steps later finds time for 14: the run makes them, its schedule the
    # one of 14 steps from there (before, a check could only shorten, and a slow first window cost the rest).
    calls = script_plan(monkeypatch, {0: 3, 1: 4, 3: 10, 8: 14, 13: 14})
    cfg = budget_config(tmp_path, llama, "run")
    summary = train.run(cfg, progress=False).summary
    assert calls == [0, 1, 3, 8, 13]
    lr = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lr) == summary["steps"] == summary["planned_steps"] == 14
    assert lr[3:8] == pytest.approx(schedule(cfg, 10)[3:8]) and lr[8:] == pytest.approx(schedule(cfg, 14)[8:])
    assert re.search(r"10m time budget: 14 steps, [\d.]+ epochs, lengthened: planned from", capsys.readouterr().out)


def test_a_plan_from_the_warm_up_step_is_never_the_last_word(tmp_path, llama, monkeypatch, capsys):
    # Issue 30: after a slow first step, its plan was 2 steps and the run ended there, never measuring another.
    # Setup: 2; after step 1: 2 still, but the run makes one step more to measure; from step 2's time: 6; before step
    # 6, its planned last, the run finds itself ahead: 8 (a check could only come 5 steps on, so it never came).
    calls = script_plan(monkeypatch, {0: 2, 1: 2, 2: 6, 5: 8, 7: 8})
    cfg = budget_config(tmp_path, llama, "run")
    summary = train.run(cfg, progress=False).summary
    assert calls == [0, 1, 2, 5, 7]
    lr = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lr) == summary["steps"] == summary["planned_steps"] == 8
    assert lr[2:5] == pytest.approx(schedule(cfg, 6)[2:5]) and lr[5:] == pytest.approx(schedule(cfg, 8)[5:])
    out = capsys.readouterr().out
    assert re.search(r"10m time budget: 6 steps, [\d.]+ epochs, planned from [\d.]+ s a step over steps 2-2", out)
    assert re.search(r"10m time budget: 8 steps, [\d.]+ epochs, lengthened: planned from [\d.]+ s a step over "
                     r"steps 2-5", out)  # fmt: skip


def test_a_budget_shorter_than_the_fixed_costs_says_so_at_the_start(tmp_path, llama, capsys):
    """Setup and the end's reserve (5 s at least) pass a 1 s budget: one note, and the least run there is."""
    cfg = budget_config(tmp_path, llama, "run").model_copy(deep=True)
    cfg.train.time_budget = 1.0
    summary = train.run(cfg, progress=False).summary
    out = capsys.readouterr().out
    note = re.findall(r"^note: train\.time_budget .*$", out, re.M)
    assert len(note) == 1 and out.index(note[0]) < out.index("training "), out
    assert re.fullmatch(
        r"note: train\.time_budget 1s is shorter than this run's fixed costs: setup took [\d.]+ s and the end needs "
        r"about [\d.]+ s \(saving the result, the card, slack\), which leaves no time to train; the run makes at "
        r"least 2 steps all the same, and ends past its budget",
        note[0],
    )
    assert summary["steps"] == summary["planned_steps"] == budget.MIN_STEPS


def test_a_resumed_time_budget_run_finishes_the_steps_its_checkpoint_planned(tmp_path, llama, monkeypatch):
    script_plan(monkeypatch, {0: 3, 1: 4, 3: 9, 8: 9})  # the check before the last step keeps it
    straight = train.run(budget_config(tmp_path, llama, "straight"), progress=False)

    def stop_after_6(step):
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_fault_injection", stop_after_6)
    with pytest.raises(KeyboardInterrupt):
        train.run(budget_config(tmp_path, llama, "killed"), progress=False)
    monkeypatch.setattr(train, "_fault_injection", lambda step: None)
    monkeypatch.setattr(budget, "plan_steps", lambda *a: pytest.fail("a resumed run keeps its checkpoint's plan"))
    resumed = train.run(budget_config(tmp_path, llama, "killed"), resume=True, progress=False)
    assert resumed.summary["steps"] == resumed.summary["planned_steps"] == 9
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_a_real_time_budget_run_ends_its_schedule_at_its_last_step(tmp_path, llama):
    """Unscripted, on this machine's clock: whatever length it plans, the run makes it, and its schedule ends there."""
    cfg = budget_config(tmp_path, llama, "run").model_copy(deep=True)
    cfg.train.time_budget = 20.0
    summary = train.run(cfg, progress=False).summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = summary["steps"]
    assert steps == summary["planned_steps"] == records[-1]["step"] == len(records) >= 1
    assert records[-1]["lr"] == pytest.approx(schedule(cfg, steps)[-1])
    assert "eval_loss" in records[-1], "the planned end is evaluated"
