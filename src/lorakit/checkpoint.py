"""Checkpoints that resume bit-for-bit, and the guard that keeps runs from overwriting each other.

A checkpoint folder holds the trainable weights (safetensors), optimizer and scheduler state, every
RNG state, and the data position. It is written under a temporary name and renamed in one step, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from lorakit import config, files
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder, latest

# Keys that may change between a run and its resume: they extend or shorten it, not change it.
RESUMABLE_CHANGES = {
    ("train", "max_steps"),
    ("train", "epochs"),
    ("train", "save_every"),
    ("train", "eval_every"),
    ("train", "keep_checkpoints"),
    ("train", "log_every"),
}


def claim_output_dir(cfg: RunConfig, resume: bool, overwrite: bool, world: int = 1) -> RunFolder:
    """Check that `output_dir` may be used by this run (`check_output_dir`) and make it (empty on --overwrite).

    Its config.yaml is written by the run once its setup has passed (`record_config`), not here: a resume that
    fails on the way (bad data, a missing tracker) leaves the config of the steps the folder holds.
    """
    run = check_output_dir(cfg, resume, overwrite, world)
    out = run.root
    try:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LorakitError(
            f"output_dir {out}: cannot write there ({e.strerror}). Pick a writable folder "
            "with output_dir=... or free some disk space."
        ) from None
    return run


def record_config(cfg: RunConfig, run: RunFolder) -> None:
    """Write the config the run trains with into its folder (also what later stages read)."""
    config.dump(cfg, run.config)


def check_output_dir(cfg: RunConfig, resume: bool, overwrite: bool, world: int = 1) -> RunFolder:
    """Refuse a run that may not use `output_dir`; reads only (a launcher checks once before any rank starts).

    A folder holding another run is never overwritten without --overwrite; --resume needs the same
    config (only the run length and logging cadence may change) and a checkpoint written by `world` processes.
    """
    run = RunFolder.of(cfg)
    out, saved = run.root, run.config  # config.yaml: also the resolved config that later stages read
    if resume and overwrite:
        raise LorakitError("--resume continues the run in output_dir and --overwrite deletes it: choose one")
    # A run that failed during setup (bad model path, bad targets) left only its config: reusable.
    if saved.is_file() and run.has_results() and not overwrite:
        if not resume:
            raise LorakitError(
                f"output_dir {out} already holds a run. Use --resume to continue it, "
                "--overwrite to start over, or set output_dir=another/folder."
            )
        diff = sorted(_diff(yaml.safe_load(saved.read_text()), cfg.model_dump(mode="json")) - RESUMABLE_CHANGES)
        if diff:
            keys = ", ".join(".".join(k) for k in diff)
            raise LorakitError(
                f"output_dir {out} holds a run with a different config ({keys} differ); "
                "resume it with its own config, or use --overwrite / another output_dir."
            )
    newest = latest(run.checkpoints) if resume else None
    if resume and newest is None:
        why = none_yet(cfg) if run.has_results() else "no run has trained there"
        raise LorakitError(
            f"--resume: {out} has no checkpoint to resume from ({why}). Run without --resume to start a run, "
            "or with --overwrite to start this one over."
        )
    if newest is not None and (written := processes(newest)) != world:
        raise LorakitError(
            f"checkpoint {newest} was written by {written} process(es); resume it with as many "
            f"(--nproc {written}), since each process's data order and random state continue from there"
        )
    if overwrite and out.exists():
        check_overwritable(out, cfg)
    return run


def check_overwritable(out: Path, cfg: RunConfig) -> None:
    """--overwrite deletes an earlier run's folder, never a folder of the user's own."""
    data = [p for p in (cfg.data.train, cfg.data.eval) if isinstance(p, str)]
    if why := files.why_not_deletable(out, RunFolder(out).config.name, data):
        raise LorakitError(
            f"--overwrite: output_dir {out} {why}; lorakit only deletes its own runs. "
            "Set output_dir=runs/NAME (a new or earlier run folder)."
        )


def _diff(a: Any, b: Any, prefix: tuple = ()) -> set[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple] = set()
        for k in a.keys() | b.keys():
            out |= _diff(a.get(k), b.get(k), (*prefix, k))
        return out
    return set() if a == b else {prefix}


def save(
    checkpoints: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    state: dict,
    keep: int,
    peft_model: Any = None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write checkpoint `step` into the run's checkpoints/ folder atomically; delete all but the newest `keep`.

    rng_states: every rank's RNG states, in rank order (default: this process's).
    """
    final = checkpoints / f"step-{step:07d}"
    with files.atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states or [rng_state()], tmp / "rng.pt")
        files.write_json(tmp / "state.json", {**state, "step": step})
        if peft_model is not None:
            # The adapter in peft's format where a run folder has it, so that every command taking a run
            # folder (eval, merge, export, serve) takes a checkpoint as it is.
            peft_model.save_pretrained(RunFolder(tmp).adapter)
    for old in sorted(checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(folder: Path, trainable: dict[str, torch.Tensor], record: dict) -> None:
    """train.keep_best: write the best evaluation's trained weights and its record ({step, eval_loss}) into
    `folder` (RunFolder.best) atomically, replacing the previous best."""
    with files.atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        files.write_json(tmp / "best.json", record)


def best(folder: Path) -> dict | None:
    """The record ({step, eval_loss}) of the best evaluation kept in `folder`, or None when none was kept."""
    path = folder / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trained weights of the best evaluation kept in `folder`, by the names of the model's parameters."""
    return load_file(folder / "trainable.safetensors")


def none_yet(cfg: RunConfig) -> str:
    """What to know about a run that has no checkpoint yet: it saves none, or where its first comes."""
    every = cfg.train.save_every
    if not every:
        return "it saves none: set train.save_every to be able to resume"
    return f"the first comes at step {min(every, cfg.train.max_steps or every)}"


def processes(path: Path) -> int:
    """How many processes wrote a checkpoint: it holds one RNG state per rank."""
    return len(_rngs(path))


def _rngs(path: Path) -> list[dict]:
    return torch.load(path / "rng.pt", weights_only=False)  # Python's and numpy's RNG states are not tensors


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNGs from a checkpoint; returns its state dict.

    The checkpoint's world size was checked with the run folder (`check_output_dir`)."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        raise LorakitError(
            f"checkpoint {path} does not fit this model (unknown parameters, e.g. "
            f"{sorted(missing)[:3]}); use --overwrite to start over."
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(_rngs(path)[rank])
    return read_state(path)


def read_state(path: Path) -> dict:
    """A checkpoint's loop counters (state.json): its step, tokens, clocks, and a time-budgeted run's plan."""
    return json.loads((path / "state.json").read_text())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
