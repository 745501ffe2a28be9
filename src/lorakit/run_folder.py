"""Run folders and where things lie in them: the one owner of where `lorakit train` puts each output, and of how
a command finds the adapter or model in a folder the user names (and what it says of a run that has not saved
one yet). What an adapter says about itself and the base it belongs to are adapter.py's.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.config import RunConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft's file: a folder holding it is an adapter
MODEL_CONFIG = "config.json"  # transformers' file: a folder holding it is a model
EVAL_JSON, EVAL_HTML = "eval.json", "eval.html"  # what `lorakit eval` writes into its output folder
# What `lorakit export --format gguf` records in its OUT (the source, the GGUF): it marks the folder as an
# export of lorakit's, the only kind `export --overwrite` writes into.
EXPORT_MARKER = "lorakit-export.json"


@dataclass(frozen=True)
class RunFolder:
    """The layout of one run's `output_dir`."""

    root: Path

    @classmethod
    def of(cls, cfg: RunConfig) -> RunFolder:
        """The run folder of a run config (its output_dir)."""
        return cls(Path(cfg.output_dir))

    @property
    def name(self) -> str:
        return self.root.name  # the default name of the run's adapter in eval and serve

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"  # the resolved config the run trained with

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"  # peft format, with the tokenizer (lora, qlora)

    @property
    def model(self) -> Path:
        return self.root / "model"  # a plain transformers folder (full fine-tuning)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        # train.keep_best: the best evaluation's trained weights so far (checkpoint.save_best). Not a step-*
        # folder, so neither --resume nor keep_checkpoints takes it for a checkpoint.
        return self.checkpoints / "best"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"  # `lorakit eval`'s default output folder: EVAL_JSON and EVAL_HTML

    @property
    def eval_json(self) -> Path:
        return self.eval_dir / EVAL_JSON

    def weights(self, method: str) -> Path:
        """Where the run's result is saved: model/ for a full fine-tune, else adapter/."""
        return self.model if method == "full" else self.adapter

    def has_results(self) -> bool:
        """Whether a run has trained here (a run that failed during setup left only its config)."""
        return any(p.exists() for p in (self.checkpoints, self.adapter, self.model, self.metrics))

    def run_config(self) -> RunConfig | None:
        from lorakit import config

        return config.load(self.config) if self.config.is_file() else None


@dataclass(frozen=True)
class Found:
    """What a folder named by the user holds: an adapter or a model, and the run it came from, if any."""

    path: Path  # the adapter folder (adapter_config.json) or model folder (config.json)
    kind: Literal["adapter", "model"]
    run: RunFolder | None  # the `lorakit train` run folder it belongs to

    @property
    def name(self) -> str:
        """The name it is served and compared under: its run's name, else its folder's."""
        return self.run.name if self.run else self.path.name

    def run_config(self) -> RunConfig | None:
        return self.run.run_config() if self.run else None


def locate(path: str | Path) -> Found | None:
    """The adapter or model in `path`: a run folder's adapter/ or model/, or `path` itself; None if neither."""
    p = Path(path)
    run = RunFolder(p)
    if (run.adapter / ADAPTER_CONFIG).is_file():
        return Found(run.adapter, "adapter", _run_of(p) or run)
    if (run.model / MODEL_CONFIG).is_file():
        return Found(run.model, "model", _run_of(p) or run)
    # The adapter/ or model/ of a run folder (or of a checkpoint), given directly, still belongs to its run.
    parent = _run_of(p.parent) if p.name in ("adapter", "model") else None
    if (p / ADAPTER_CONFIG).is_file():
        return Found(p, "adapter", parent)
    if (p / MODEL_CONFIG).is_file():
        return Found(p, "model", parent)
    return None


def _run_of(folder: Path) -> RunFolder | None:
    """The run a folder holding adapter/ or model/ belongs to: itself if it holds config.yaml, and for a
    checkpoint (RUN/checkpoints/step-N) the run RUN, whose config says its base and method (QLoRA or not)."""
    if RunFolder(folder).config.is_file():
        return RunFolder(folder)
    run = RunFolder(folder.parent.parent)
    return run if folder.parent.name == "checkpoints" and run.config.is_file() else None


def check_finished(path: str | Path) -> None:
    """Refuse a `lorakit train` run folder that has no adapter/ or model/ yet (a run saves it when it ends:
    this one was interrupted, or failed), saying how to use its newest checkpoint or finish the run."""
    run = RunFolder(Path(path))
    if not run.config.is_file() or locate(path) is not None:
        return
    try:
        cfg = run.run_config()
    except LorakitError:  # a config that no longer loads: the message below still holds
        cfg = None
    what = f"{run.weights(cfg.method).name}/" if cfg is not None else "adapter/ (or model/)"
    said = f"{path} is a run of `lorakit train` that did not finish: it has no {what} yet (a run saves it when it ends)"
    newest = latest(run.checkpoints)
    if newest is None:
        again = shlex.join(["lorakit", "train", str(run.config), *(["--overwrite"] if run.has_results() else [])])
        raise LorakitError(
            f"{said}, and it saved no checkpoint to resume from. Train it again: {again} "
            "(with train.save_every set, an interrupted run can be resumed)"
        )
    # config.yaml is the resolved config, output_dir included: --resume finds this folder when output_dir
    # (relative to the folder the run started in) leads here.
    here = cfg is None or Path(cfg.output_dir).resolve() == run.root.resolve()
    resume = shlex.join(["lorakit", "train", str(run.config), "--resume"]) + (
        "" if here else f" (from the folder the run was started in: its output_dir is {cfg.output_dir})"
    )
    use = (
        f"give its newest checkpoint {shlex.quote(str(newest))} instead (it holds the adapter in peft format), or "
        if (newest / "adapter" / ADAPTER_CONFIG).is_file()
        else ""
    )
    raise LorakitError(f"{said}. To use it, {use}finish the run: {resume}")


def latest(checkpoints: Path) -> Path | None:
    """The newest checkpoint in a run's checkpoints/ (a step-NNNNNNN/ folder of checkpoint.save's, with its
    state.json), or None."""
    found = sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def find_adapter(path: str | Path) -> Path | None:
    """The adapter folder at `path` (a run folder's adapter/, or `path` itself), or None."""
    found = locate(path)
    return found.path if found is not None and found.kind == "adapter" else None


def adapter_source(path: str | Path) -> Found:
    """The adapter at `path`, or one message saying why there is none."""
    found = locate(path)
    if found is None:
        check_finished(path)
    if found is not None and found.kind == "model" and found.run is not None:
        raise LorakitError(
            f"{path} is a full fine-tune: its model/ folder is already a plain model with no "
            "adapter; use it (merge it, export it, serve it with --model) as it is"
        )
    if found is None or found.kind != "adapter":
        raise LorakitError(
            f"{path}: no {ADAPTER_CONFIG} there (nor in {Path(path) / 'adapter'}); give an adapter "
            "folder or a run folder of `lorakit train`"
        )
    return found


def adapter_dir(path: str | Path) -> Path:
    """An adapter folder, or a run folder holding adapter/ (LorakitError if neither)."""
    return adapter_source(path).path
