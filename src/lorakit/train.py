"""The training recipe: setup → train → finish. Readable top to bottom; no callbacks, no Trainer.

Data order is a pure function of (seed, step): step s trains on rows s*N .. s*N+N-1 of the stream of
seeded per-epoch permutations. With weights, optimizer, scheduler and RNGs restored from a checkpoint,
a resumed run therefore repeats exactly what the killed run would have done.

A preference objective (dpo, orpo, kto) trains the same way on preference_train's items (a pair, a KTO row), one
a row, against the reference log-probs that reference.py scores once before the first step; the step's forward and
backward, and the held-out evaluation, are preference_train's.

With train.time_budget the run plans its own length (budget.py): each plan comes before a step, and the schedule
is rebuilt for each new length, so the planned last step takes the schedule's last rate; checkpoints record the plan
so that a resumed run finishes the same steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from lorakit import (
    adapter,
    attention,
    card,
    checkpoint,
    data,
    files,
    kernels,
    launch,
    loss,
    model,
    packing,
    plan,
    preference_train,
    reference,
    tracking,
)
from lorakit import budget as time_budget
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.render import IGNORE
from lorakit.run_folder import RunFolder, latest

MIXED = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}
SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}


@dataclass
class Result:
    summary: dict[str, Any]  # also in the run folder's summary.json
    # the trained model (PeftModel for lora/qlora), unwrapped from accelerate, as its last step left it (with
    # train.keep_best the run folder's adapter/ or model/ holds the best evaluation's weights instead)
    model: Any
    tokenizer: Any


def run(
    cfg: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force: bool = False,
    device: str = "auto",
) -> Result:
    """Train one run; the adapter (or model), metrics, plot and summary land in output_dir.

    force: train even where `lorakit plan` predicts the run does not fit this device. device: as --device says
    (auto: the GPU when there is one; under a launch each rank takes the GPU of its LOCAL_RANK).
    """
    started = time.perf_counter()  # a time budget counts from here: loading the model and data is part of it
    t = setup(cfg, resume, overwrite, force, device, started)
    last_eval = train(t, progress)
    summary = finish(t, last_eval)
    return Result(summary, t.net, t.tokenizer)


@dataclass
class Training:
    """What the loop needs, built by `setup`: the run, its model and optimizer, its rows and where it stands."""

    cfg: RunConfig
    accelerator: Accelerator
    run: RunFolder
    tokenizer: Any
    net: Any  # the model (a PeftModel for lora/qlora)
    step_fn: Any  # what runs the loss, wrapped for DDP/FSDP by accelerate
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    params: tuple[int, int]  # (trained, all) parameters
    examples: list[dict]  # tokenized training examples (a preference run's: its items, preference_train.items)
    rows: list[list[int]]  # each row: the examples packed into it (one, unpacked; a preference run's: one item)
    eval_examples: list[dict]
    eval_rows: list[list[int]]
    use_positions: bool  # packed rows kept apart by restarting position ids
    attention: str  # how the model attends (attention.choose); padding-free ones take each micro-batch as one row
    per_step: int  # rows per optimizer step, all ranks
    total_steps: int
    start: int  # the last step done (a resumed run's checkpoint)
    # tokens, trained_tokens; elapsed: wall time of the loop, evaluation included; eval_s: the part spent
    # evaluating; train_s: elapsed less eval_s when the last step had trained, before its evaluation
    state: dict[str, Any]
    row_tokens: list[int] = field(default_factory=list)  # input tokens of each of `rows`
    budget: time_budget.Budget | None = None  # train.time_budget's plan and measurements
    best: dict | None = None  # train.keep_best: the best evaluation so far, {step, eval_loss}
    reference_s: float | None = None  # DPO's and KTO's reference pass: seconds scoring (0.0: read from its cache)

    @property
    def preference(self) -> bool:
        """Whether the run trains a preference objective (dpo, orpo, kto) rather than sft."""
        return self.cfg.objective != "sft"


def setup(cfg: RunConfig, resume: bool, overwrite: bool, force: bool, device: str, started: float) -> Training:
    """Device, the run folder, data, model, optimizer and schedule, and a checkpoint's state on --resume.

    Nothing is written into the run folder before every check here passed (config.yaml comes last).
    started: when the run began (time.perf_counter()), which a time budget counts from.
    """
    device = use_device(device)
    dtype = model.pick_dtype(cfg.train.precision, device)
    if "LOCAL_RANK" in os.environ:  # one rank of a launch: a plain single-process run has nothing to shard
        launch.check_strategy(cfg, device == "cuda", resume)
    # cpu=True: several CPU processes (torchrun on a machine without a GPU) then join over gloo. mixed_precision is
    # always given, so pick_dtype alone decides it: accelerate would otherwise read ACCELERATE_MIXED_PRECISION or its
    # config, and its own bf16 check (torch.cuda.is_bf16_supported) says yes on a T4, where bf16 is only emulated.
    accelerator = Accelerator(
        mixed_precision=MIXED[dtype],
        log_with=cfg.track or None,
        project_dir=cfg.output_dir,
        cpu=device == "cpu",
        fsdp_plugin=fsdp_plugin(cfg),
    )
    # Before the folder is claimed: its config.yaml holds the micro-batch that really ran (batch_size: auto).
    batch, estimate = plan.check_run(cfg, device, accelerator.num_processes, force)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch})})
    if estimate:
        accelerator.print(estimate)
    # The main rank claims the folder (and deletes an old run on --overwrite) before any other rank looks.
    with accelerator.main_process_first():
        mine = overwrite and accelerator.is_main_process
        run = checkpoint.claim_output_dir(cfg, resume, mine, accelerator.num_processes)
    tracking.check_trackers(cfg.track, run.root)
    set_seed(cfg.train.seed)
    tokenizer = model.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    with accelerator.main_process_first():  # tokenize once; the other ranks then read the cache
        prepared = data.prepare(cfg.data, tokenizer, cfg.objective, cfg.preference)
    net = build_model(cfg, dtype, accelerator.device)
    if cfg.objective == "sft":
        use_positions = cfg.data.packing and attention.reads_packed_rows(net)
        if cfg.data.packing and not use_positions and accelerator.is_main_process:
            print(f"note: {type(net).__name__} cannot keep packed examples apart; training without packing")
        rows = _rows(prepared.train, cfg.data.max_length, use_positions)
        eval_rows = _rows(prepared.eval, cfg.data.max_length, use_positions)
        examples, eval_examples = _examples(prepared.train), _examples(prepared.eval) if eval_rows else []
        row_tokens = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
        eval_tokens = sum(len(x["input_ids"]) for x in eval_examples)
    else:  # items, one a row: a pair's sequences share that row wherever the model reads packed rows
        use_positions = attention.reads_packed_rows(net)
        examples, eval_examples = (preference_train.items(ds, cfg.objective, cfg.data.max_length)
                                   for ds in (prepared.train, prepared.eval))  # fmt: skip
        rows, eval_rows = packing.unpacked(len(examples)), packing.unpacked(len(eval_examples))
        row_tokens = [preference_train.tokens(x) for x in examples]
        eval_tokens = sum(preference_train.tokens(x) for x in eval_examples)
    if cfg.train.keep_best and not eval_rows:
        raise LorakitError(f"train.keep_best: data.eval ({cfg.data.eval}) gave no held-out rows to evaluate on")
    # DPO's and KTO's reference, scored (or read) with the starting weights: before accelerate wraps the model, and
    # before a time budget plans the steps from the time left.
    reference_s = reference.attach(cfg, prepared.cache_path, net, examples, eval_examples, accelerator,
                                   tokenizer.pad_token_id, use_positions, dtype)  # fmt: skip
    params = adapter.count_params(net)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    budget, total_steps = None, cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(rows) / per_step))
    if cfg.train.time_budget:
        budget, total_steps = time_budget.start(
            cfg, accelerator, run, resume, device, per_step, row_tokens, eval_tokens, params[0], started
        )
    unit = "rows" if cfg.objective == "sft" else preference_train.unit(cfg.objective)  # what a step counts
    if per_step > len(rows):
        accelerator.print(
            f"note: one step takes {per_step} {unit} (batch_size x grad_accum x processes) but the data makes "
            f"{len(rows)}: {unit} repeat within every step. Lower train.batch_size or train.grad_accum, or add data."
        )
    optimizer = build_optimizer(net, cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps)
    on = loss.OnTrainedTokens if cfg.objective == "sft" else loss.OnSequences  # what the step's forward returns
    step_fn, optimizer = accelerator.prepare(on(net), optimizer)
    state = resume_state(accelerator, run, net, optimizer, scheduler, resume)
    if budget:  # what checkpoints record: a resumed run finishes these steps
        state.setdefault("planned_steps", total_steps)
        state.setdefault("budget_final", budget.final)
    # The best kept so far, as it stands: it may come from after the checkpoint resumed from. Its weights are
    # still an evaluation's own; the resumed run replaces them only with a strictly better one, and an exact resume
    # evaluates that step to the same loss again.
    best = checkpoint.best(run.best) if cfg.train.keep_best and resume else None
    if accelerator.is_main_process:  # only now that setup passed and the checkpoint is loaded (claim_output_dir)
        checkpoint.record_config(cfg, run)
    if cfg.track:
        accelerator.init_trackers("lorakit", config=_flat(cfg.model_dump(mode="json")))
    accelerator.print(
        f"training {params[0]:,} of {params[1]:,} parameters ({cfg.method}, {dtype}, {accelerator.device}"
        + (f") on {len(prepared.train)} examples in {len(rows)} rows; " if cfg.objective == "sft"
           else f", objective {cfg.objective}) on {len(rows)} {unit}; ")
        + f"{total_steps} steps of {per_step} {unit}"
        + (f" ({time_budget.duration(budget.seconds)} time budget: "
           f"{time_budget.epochs(total_steps, per_step, len(rows)):.2f} epochs"
           + (", as its checkpoint planned)" if budget.final else " for now: re-planned from the first steps' speed)")
           if budget else "")
    )  # fmt: skip
    return Training(
        cfg, accelerator, run, tokenizer, net, step_fn, optimizer, scheduler, dtype, params,
        examples=examples, rows=rows, eval_examples=eval_examples, eval_rows=eval_rows, use_positions=use_positions,
        attention=attention.name(net), per_step=per_step, total_steps=total_steps, start=state.get("step", 0),
        state=state, row_tokens=row_tokens, budget=budget, best=best, reference_s=reference_s,
    )  # fmt: skip


def resume_state(accelerator: Accelerator, run: RunFolder, net: Any, optimizer: Any, scheduler: Any,
                 resume: bool) -> dict[str, Any]:  # fmt: skip
    """The loop's counters: from the newest checkpoint on --resume (weights, optimizer, schedule and RNGs restored
    with them, metrics after its step dropped), else from zero (and no metrics of an earlier run)."""
    state = {"tokens": 0, "positions": 0, "shared": 0, "trained_tokens": 0, "elapsed": 0.0, "eval_s": 0.0,
             "train_s": 0.0}  # fmt: skip
    if resume and (ckpt := latest(run.checkpoints)):
        state = checkpoint.load(ckpt, net, optimizer, scheduler, accelerator.process_index)
        state.setdefault("train_s", state["elapsed"] - state["eval_s"])  # checkpoints written before train_s was kept
        state.setdefault("positions", state["tokens"])  # written before padding was counted: none counted then
        state.setdefault("shared", 0)  # written before prompts were shared
        tracking.truncate_after(run.metrics, state["step"])
        accelerator.print(f"resumed from {ckpt} (step {state['step']})")
    else:
        run.metrics.unlink(missing_ok=True)
    return state


def train(t: Training, progress: bool) -> dict[str, float] | None:
    """Steps t.start+1 .. t.total_steps: log, evaluate and checkpoint on their cadence. Returns the last evaluation's
    metrics (eval_loss, and a preference run's eval_rewards_accuracy ...).

    A time budget may re-plan t.total_steps after the first steps (replan), so the loop reads it at every step.
    """
    cfg, accelerator, state, budget = t.cfg, t.accelerator, t.state, t.budget
    t.step_fn.train()
    bar = tqdm(total=t.total_steps, initial=t.start, disable=not (progress and accelerator.is_local_main_process),
               desc=_bar_title(t), unit="step", dynamic_ncols=True)  # fmt: skip
    pad = t.tokenizer.pad_token_id
    order = DataOrder(len(t.rows), cfg.train.seed)
    last_eval = None
    t0 = time.perf_counter() - state["elapsed"]
    step = t.start
    while step < t.total_steps:
        step += 1
        if budget and budget.due(step, t.total_steps):  # before the step: its rate comes from the new schedule
            replan(t, step, bar)
        tic = time.perf_counter()
        step_rows = order.rows(step - 1, t.per_step)[accelerator.process_index :: accelerator.num_processes]
        flat = attention.padding_free(t.attention)
        micro = [collate(t, group, pad, flat) for group in micro_batches(step_rows, t.row_tokens, cfg.train.batch_size)]
        record = train_step(t, step, micro)
        if budget:
            budget.durations.append(time.perf_counter() - tic)
        state["train_s"] = time.perf_counter() - t0 - state["eval_s"]
        record |= {
            "tokens_per_s": _throughput(state, accelerator.num_processes),
            "tokens": state["tokens"] * accelerator.num_processes,  # input tokens so far, all ranks
            "train_s": round(state["train_s"], 3),  # training time so far, evaluation left out
        }
        if t.eval_rows and (step == t.total_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
            t_eval = time.perf_counter()
            last_eval = eval_metrics(t, pad, flat)
            record |= last_eval
            if cfg.train.keep_best:  # counted as evaluation time: picking the best is part of evaluating
                keep_if_best(t, step, last_eval["eval_loss"])
            took = time.perf_counter() - t_eval
            state["eval_s"] += took
            if budget:
                budget.eval_s = max(budget.eval_s or 0.0, took)
        # Before the checkpoint, evaluation included: a resumed run's clock goes on from here, and
        # elapsed - eval_s stays its training time.
        state["elapsed"] = time.perf_counter() - t0
        if accelerator.is_main_process and (
            step % cfg.train.log_every == 0 or "eval_loss" in record or step == t.total_steps
        ):
            tracking.append(t.run.metrics, record)
            if cfg.track:
                accelerator.log(record, step=step)
        acc = {"acc": f"{record['rewards_accuracy']:.2f}"} if t.preference else {}  # reward accuracy
        bar.set_postfix(loss=f"{record['loss']:.4f}", **acc, tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        # The last step is saved too: a finished run then resumes exactly when max_steps is raised. With keep_best
        # it always is: adapter/ holds the best weights, and the last ones must be somewhere.
        last, every = step == t.total_steps, cfg.train.save_every
        if (every and step % every == 0) or (last and (every or cfg.train.keep_best)):
            tic = time.perf_counter()
            save_checkpoint(accelerator, t.step_fn, t.net, t.run, step, t.optimizer, t.scheduler, state, cfg)
            if budget:
                budget.save_s = max(budget.save_s or 0.0, time.perf_counter() - tic)
        _fault_injection(step)
    bar.close()
    state["elapsed"] = time.perf_counter() - t0  # the whole loop, the last evaluation and checkpoint included
    return last_eval


def collate(t: Training, group: list[int], pad: int, flat: bool) -> Any:
    """One micro-batch of the rows `group`: packing.collate's batch, or a preference run's items
    (preference_train.micro_batch: the sequences with their reference log-probs)."""
    if t.preference:
        share = attention.shares_prefix(t.attention)
        return preference_train.micro_batch([t.examples[r] for r in group], pad, t.use_positions, flat, share)
    return packing.collate([[t.examples[i] for i in t.rows[r]] for r in group], pad, t.use_positions, flat)


def eval_metrics(t: Training, pad: int, flat: bool) -> dict[str, float]:
    """The held-out metrics: eval_loss, the mean loss per trained token; a preference run's objective's loss per
    pair (row) with its rewards and log-probs (preference_train.evaluate), so keep_best compares the loss trained."""
    c = t.cfg
    if t.preference:
        return preference_train.evaluate(t.net, t.eval_examples, c.train.batch_size, pad, t.use_positions, flat,
                                         t.accelerator, c.objective, c.preference,
                                         attention.shares_prefix(t.attention))  # fmt: skip
    return {"eval_loss": eval_loss(t.net, t.eval_examples, t.eval_rows, c.train.batch_size, pad, t.use_positions,
                                   t.accelerator)}  # fmt: skip


def replan(t: Training, step: int, bar: Any) -> None:
    """train.time_budget: before `step`, set the run's total steps from the speed measured so far (Budget.replan),
    and rebuild the schedule for the new total, standing where the steps done left it."""
    b, done = t.budget, step - 1
    checking, since = b.final, b.first + 1
    total, step_s = b.replan(done)
    total = time_budget.agree(t.accelerator, total)
    t.state.update(planned_steps=total, budget_final=b.final)
    before, changed = t.total_steps, total != t.total_steps
    if changed:
        t.scheduler = stretch_schedule(t.scheduler, t.cfg, total, done)
        t.total_steps = bar.total = total
        bar.set_description(_bar_title(t))
    if b.final and (changed or not checking) and t.accelerator.is_main_process:
        warmup = t.cfg.train.warmup_steps
        tqdm.write(
            f"{time_budget.line(b.seconds, total, t.per_step, len(t.rows))}, "
            + (("shortened: " if total < before else "lengthened: ") if checking else "")
            + f"planned from {step_s:.3g} s a step over steps {since}-{done}"
            + (f"; note: fewer than train.warmup_steps ({warmup}): the rate never reaches its peak"
               if total <= warmup else "")
        )  # fmt: skip


def stretch_schedule(scheduler: Any, cfg: RunConfig, total: int, done: int) -> Any:
    """A schedule of `total` steps standing where `scheduler` stood after `done` steps: the one a run built for
    `total` from the start would have there, so warmup and decay still end at the last step."""
    stretched = build_schedule(scheduler.optimizer, cfg, total)  # its optimizer keeps each group's initial_lr
    for _ in range(done):
        stretched.step()
    return stretched


def keep_if_best(t: Training, step: int, value: float) -> None:
    """train.keep_best: when this evaluation beats every earlier one, write its trained weights into the run's
    best/ (on disk, so that a resumed run keeps it). Every rank takes part: FSDP gathers the weights."""
    if not math.isfinite(value) or (t.best is not None and value >= t.best["eval_loss"]):
        return
    weights = whole_state(t.accelerator, t.step_fn)
    t.best = {"step": step, "eval_loss": value}
    if t.accelerator.is_main_process:
        checkpoint.save_best(t.run.best, adapter.trainable_state(t.net, weights), t.best)
    t.accelerator.wait_for_everyone()


def with_best(weights: dict[str, torch.Tensor], best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole state dict `weights` with the trained weights of `best` (keep_best) in it. A tied weight is one
    parameter under two names (a full fine-tune's lm_head and embeddings): both take the best."""
    by_storage = {weights[k].data_ptr(): v for k, v in best.items() if k in weights}
    return {k: best.get(k, by_storage.get(v.data_ptr(), v)) for k, v in weights.items()}


def train_step(t: Training, step: int, micro: list[dict]) -> dict[str, Any]:
    """One optimizer step over its micro-batches; its record for metrics.jsonl (loss, lr, grad norm; a preference
    run's rewards and log-probs, objectives.METRICS)."""
    accelerator = t.accelerator
    if t.preference:
        c = t.cfg
        scores, n_target, n_tokens = preference_train.accumulate(t.step_fn, t.net, micro, accelerator, c.objective,
                                                                 c.preference)  # fmt: skip
        batches = [m["batch"] for m in micro]
        t.state["shared"] += sum(m["shared"] for m in micro)
    else:
        step_loss, n_target, n_tokens = accumulate(t.step_fn, micro, accelerator, t.tokenizer.pad_token_id)
        total = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum"))
        scores, batches = {"loss": total / max(n_target, 1)}, micro
    t.state["tokens"] += n_tokens
    t.state["positions"] += sum(b["input_ids"].numel() for b in batches)  # what the linear layers ran on, padding too
    max_norm = t.cfg.train.max_grad_norm
    grad_norm = accelerator.clip_grad_norm_(t.step_fn.parameters(), max_norm) if max_norm else None
    lr = t.scheduler.get_last_lr()[0]  # the rate this step uses; stepping the scheduler sets the next one
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.state["trained_tokens"] += n_target
    record = {"step": step, "loss": scores.pop("loss"), "lr": lr}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record | scores


def finish(t: Training, last_eval: dict[str, float] | None) -> dict[str, Any]:
    """Save the adapter (or model), the loss plot, summary.json and the model card; the summary (main rank)."""
    accelerator, cfg, state = t.accelerator, t.cfg, t.state
    accelerator.wait_for_everyone()
    weights = whole_state(accelerator, t.step_fn)
    summary = {}
    if accelerator.is_main_process:
        if t.best is not None:  # keep_best: the last weights stay in the newest checkpoint
            weights = with_best(weights, checkpoint.best_weights(t.run.best))
        elif cfg.train.keep_best:
            print("note: train.keep_best: no evaluation gave a finite eval loss; the last step's weights are saved")
        save_result(t.net, t.tokenizer, t.run.weights(cfg.method), weights, base=cfg.model)
        records = tracking.read(t.run.metrics)
        tracking.plot(records, t.run.loss_plot)
        if t.start >= t.total_steps:  # a resumed run with no step left evaluated nothing: its last evaluation stands
            last_eval = next(({k: v for k, v in r.items() if k.startswith("eval_")} for r in reversed(records)
                              if "eval_loss" in r), None)  # fmt: skip
        summary = {  # also the run folder's summary.json
            "steps": t.total_steps,
            "method": cfg.method,
            "tokens": state["tokens"] * accelerator.num_processes,
            "trained_tokens": state["trained_tokens"],
            "wall_time_s": round(state["elapsed"], 2),
            "tokens_per_s": round(_throughput(state, accelerator.num_processes), 1),  # as the last step logged
            "train_s": round(state["train_s"], 3),  # as the last step logged
            "eval_s": round(state["eval_s"], 2),
            "peak_memory_mb": peak_memory_mb(),
            "final_train_loss": records[-1]["loss"] if records else None,
            "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
            "trainable_params": t.params[0],
            "total_params": t.params[1],
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "strategy": "fsdp" if accelerator.is_fsdp2 else "ddp" if accelerator.num_processes > 1 else "single",
            "dtype": str(t.dtype).removeprefix("torch."),
            "packing": t.use_positions and not t.preference,  # a preference run's pairs are never packed together
            "attention": t.attention,  # attention.choose's: sdpa-per-row, flash_attention_2, ... or the model's own
            # of the positions this rank's micro-batches held, the padding: 0 where the attention is padding-free
            "padding_share": round(1 - (state["tokens"] - state["shared"]) / max(state["positions"], 1), 4),
            "kernels": kernels.applied(t.net),  # liger's, as train.kernels chose: [] for none
            "examples": len(t.examples),
            "rows": len(t.rows),
            "epochs": round(time_budget.epochs(t.total_steps, t.per_step, len(t.rows)), 3),  # passes over the rows
        }
        if t.preference:  # the last evaluation's rewards and log-probs beside its loss: final_eval_rewards_accuracy...
            # of the input tokens, those that ran once for two sequences (a pair's prompt: preference_train.branch)
            summary |= {"objective": cfg.objective, "shared_share": round(state["shared"] / max(state["tokens"], 1), 4)}
            if t.reference_s is not None:  # this process's reference pass, before step 1: 0.0 where it was read
                summary["reference_s"] = round(t.reference_s, 2)
            summary |= {f"final_{k}": v for k, v in (last_eval or {}).items() if k != "eval_loss"}
        if t.budget:  # planned_steps: as "steps"; the budget counts from setup, so more than wall_time_s
            summary |= {"time_budget_s": t.budget.seconds, "planned_steps": t.total_steps,
                        "budget_used_s": round(t.budget.spent(), 2)}  # fmt: skip
        if t.best is not None:  # what adapter/ (model/) holds
            summary |= {"keep_best": cfg.train.keep_best, "best_step": t.best["step"],
                        "best_eval_loss": t.best["eval_loss"]}  # fmt: skip
        files.write_json(t.run.summary, summary)
        card.write(t.run.weights(cfg.method), "model" if cfg.method == "full" else "adapter", cfg.model, t.run)
    # end_training destroys the process group: a rank that did so while the main rank was still saving hung
    # in gloo's teardown once the main rank had exited (seen once in a fresh-clone make test). All ranks
    # leave together.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def use_device(device: str) -> str:
    """The device this process trains on (model.pick_device): cpu, or cuda made the current GPU for accelerate."""
    device = model.pick_device(device)
    if device.startswith("cuda:"):
        if "LOCAL_RANK" in os.environ:
            raise LorakitError(
                f"--device {device}: under a launch each rank trains on the GPU of its local rank; use --device cuda "
                "(or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        torch.cuda.set_device(torch.device(device))  # accelerate's single process trains on the current GPU
    return "cuda" if device.startswith("cuda") else device


def build_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    warmup = cfg.train.warmup_steps
    if cfg.train.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return SCHEDULES[cfg.train.scheduler](optimizer, warmup, total_steps)


def save_checkpoint(accelerator: Accelerator, step_fn: Any, net: Any, run: Any, step: int, optimizer: Any,
                    scheduler: Any, state: dict, cfg: RunConfig) -> None:  # fmt: skip
    """Checkpoint `step`. Every rank takes part: its RNG states are gathered, and FSDP gathers the weights."""
    weights, rngs = whole_state(accelerator, step_fn), gather_object([checkpoint.rng_state()])
    if accelerator.is_main_process:
        # A full fine-tune's weights are all in the checkpoint's trainable.safetensors already.
        checkpoint.save(run.checkpoints, step, adapter.trainable_state(net, weights), optimizer, scheduler, dict(state),
                        cfg.train.keep_checkpoints, peft_model=None if cfg.method == "full" else net,
                        rng_states=rngs)  # fmt: skip
    accelerator.wait_for_everyone()


def whole_state(accelerator: Accelerator, step_fn: Any) -> dict[str, torch.Tensor]:
    """The model's whole state dict, by its own names: gathered on the main rank under FSDP, where every rank
    must take part."""
    return {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(step_fn).items()}


def accumulate(net: Any, micro: list[dict], accelerator: Accelerator, pad: int) -> tuple[float, int, int]:
    """Forward and backward over one optimizer step's micro-batches.

    The loss is normalized by the trained tokens of the whole step on all ranks: grad-accum 4 × batch 2
    then gives the same gradient as batch 8, however the tokens are spread over the micro-batches.
    Returns (summed loss on this rank, trained targets on all ranks, input tokens on this rank).
    """
    local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    n_target = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    step_loss, n_tokens = 0.0, 0
    for k, batch in enumerate(micro):
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        last = k == len(micro) - 1
        with accelerator.no_sync(net) if not last else nullcontext(), accelerator.autocast():
            total, _ = net(**batch)  # loss.OnTrainedTokens, prepared by accelerate
            # DDP averages gradients over ranks; scaling by their count turns that into a sum.
            accelerator.backward(total * accelerator.num_processes / max(n_target, 1))
        step_loss += total.item()
        n_tokens += batch["input_ids"].numel() - _padding(batch, pad)
    return step_loss, n_target, n_tokens


def fsdp_plugin(cfg: RunConfig) -> Any:
    """FSDP2 through accelerate for `train.strategy: fsdp` (None otherwise): each decoder layer sharded over the
    ranks; the whole weights are gathered to the main rank to save."""
    if cfg.train.strategy != "fsdp":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
    )


def build_model(cfg: RunConfig, dtype: torch.dtype, device: Any) -> Any:
    """Base model in the run's dtype (4-bit for qlora), made trainable by the method."""
    if cfg.method == "qlora":
        base = model.load_model(
            cfg.model,
            dtype=dtype,
            device=device,
            quantization="4bit",
            compute_dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        # Full fine-tuning keeps fp32 master weights and lets autocast run the matmuls in 16 bits;
        # LoRA keeps the frozen base in 16 bits (half the memory) and peft keeps adapters in fp32.
        base = model.load_model(
            cfg.model,
            dtype=torch.float32 if cfg.method == "full" else dtype,
            device=device,
            trust_remote_code=cfg.trust_remote_code,
        )
    base.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    kernels.apply(base, cfg.train.kernels, device)  # before peft wraps the modules liger patches
    attention.use(base, device, dtype)  # how a micro-batch's rows attend, each to itself (attention.py)
    return adapter.attach(base, cfg)


def build_optimizer(net: Any, cfg: RunConfig) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "adamw":
        fused = all(p.is_cuda for p in params)  # the fused kernel is one launch per step on GPUs
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorakitError(f"train.optimizer: {t.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def micro_batches(step_rows: list[int], row_tokens: list[int], batch_size: int) -> list[list[int]]:
    """A step's rows split into micro-batches of similar length, longest first.

    Where each micro-batch pads to its longest row (an attention that is not padding-free), grouping rows of like
    length skips padding (4-row batches of Alpaca-GPT4 answers: 43% padding at random, 30% grouped within 8-row
    steps). The step's loss and gradient are unchanged (tests/unit/test_loss.py): they sum over all its rows and
    divide by the step's trained tokens (see accumulate). Longest first: a step that does not fit in memory fails
    at its first micro-batch.
    """
    ordered = sorted(step_rows, key=lambda r: -row_tokens[r])
    return [ordered[j : j + batch_size] for j in range(0, len(ordered), batch_size)]


class DataOrder:
    """Row order as a pure function of (seed, epoch): a new permutation of all rows every epoch."""

    def __init__(self, n_rows: int, seed: int):
        self.n, self.seed = n_rows, seed
        self._cache: dict[int, list[int]] = {}

    def rows(self, step: int, per_step: int) -> list[int]:
        out = []
        for pos in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(pos, self.n)
            if epoch not in self._cache:
                perm = list(range(self.n))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
                self._cache = {epoch: perm}
            out.append(self._cache[epoch][i])
        return out


def eval_loss(
    net: Any,
    examples: list[dict],
    rows: list[list[int]],
    batch_size: int,
    pad: int,
    use_positions: bool,
    accelerator: Accelerator,
) -> float:
    """Mean loss per trained token over the held-out rows, each rank taking its share.

    Under FSDP every forward is a collective that all ranks must make alike: each rank then evaluates every
    row (the sums over ranks grow n-fold together, so their ratio is the same).
    """
    mine = rows if accelerator.is_fsdp2 else rows[accelerator.process_index :: accelerator.num_processes]
    total, count = loss.eval_sums(
        net, examples, mine, batch_size, pad, use_positions, accelerator.device, accelerator.autocast
    )
    sums = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum")
    return float(sums[0] / max(sums[1], 1))


def save_result(net: Any, tokenizer: Any, target: Path, weights: dict | None = None, base: str | None = None) -> None:
    """Adapter in peft's format (or the full model) with the tokenizer, written atomically.

    weights: the whole state dict (accelerate's get_state_dict: gathered under FSDP, where the model's own
    parameters are shards). A serving process watching this folder sees the old version or the new one.
    base: the base model as the run named it; the adapter records it portably (model.portable).
    """
    with files.atomic_dir(target) as tmp:
        net.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        meta = tmp / "adapter_config.json"
        if base is not None and meta.is_file():
            # peft wrote the folder the base was loaded from: for the alias, a cache path on this machine
            # only. Rewritten after saving, so that peft's save looks nothing up on the hub.
            saved = json.loads(meta.read_text(encoding="utf-8"))
            saved["base_model_name_or_path"] = model.portable(base)
            files.write_json(meta, saved)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _rows(ds: Any, max_length: int, use_positions: bool) -> list[list[int]]:
    if ds is None:
        return []
    lengths = [len(x) for x in ds["input_ids"]]
    return packing.pack(lengths, max_length) if use_positions else packing.unpacked(len(lengths))


def _bar_title(t: Training) -> str:
    return (
        f"training ({time_budget.line(t.budget.seconds, t.total_steps, t.per_step, len(t.rows))})"
        if t.budget
        else "training"
    )


def _throughput(state: dict, world: int) -> float:
    """Input tokens per second of training (evaluation time excluded), over all ranks."""
    return state["tokens"] * world / max(state["train_s"], 1e-9)


def _examples(ds: Any) -> list[dict]:
    # Plain lists: indexing a datasets.Dataset row by row costs more than the collation itself.
    return [{"input_ids": a, "labels": b} for a, b in zip(ds["input_ids"], ds["labels"])]


def _padding(batch: dict, pad: int) -> int:
    if "attention_mask" in batch:
        return int((batch["attention_mask"] == 0).sum())
    if batch["input_ids"].shape[0] == 1:  # collate pads rows to the longest: one row has none (an end pad id is eos)
        return 0
    # Padding is the trailing segment; count trailing pad ids per row.
    ids = batch["input_ids"]
    pads = 0
    for row in ids.tolist():
        n = len(row)
        while n and row[n - 1] == pad:
            n -= 1
        pads += len(row) - n
    return pads


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _fault_injection(step: int) -> None:
    # Tests kill the real process at a chosen step (SIGKILL: no cleanup runs) to prove resume is exact,
    # or press Ctrl-C there (SIGINT) to see what the user is told; LORAKIT_FAULT_RANK picks one rank of several.
    rank = os.environ.get("LORAKIT_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    for variable, sig in (("LORAKIT_KILL_AFTER_STEP", signal.SIGKILL), ("LORAKIT_INTERRUPT_AFTER_STEP", signal.SIGINT)):
        at = os.environ.get(variable)
        if at and int(at) == step:
            os.kill(os.getpid(), sig)
    # "STEP:SIGNAL", e.g. "3:SIGTERM": the signal goes to this rank's launcher (its parent), as a Ctrl-C in its
    # terminal or a scheduler's SIGTERM would. The launcher passes it on to every rank; waiting for it here makes
    # the run stop at this step.
    at, _, name = os.environ.get("LORAKIT_SIGNAL_LAUNCHER_AFTER_STEP", "").partition(":")
    if at and int(at) == step:
        os.kill(os.getppid(), signal.Signals[name])
        signal.pause()
