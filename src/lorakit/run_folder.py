"""Run folders and the adapters in them: the one owner of where `lorakit train` puts each output, of how a
command finds the adapter or model in a folder the user names, of what an adapter says about itself
(peft's own `PeftConfig`), and of the rule that decides whether an adapter belongs to a base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from peft import PeftConfig

    from lorakit.config import RunConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft's file: a folder holding it is an adapter
MODEL_CONFIG = "config.json"  # transformers' file: a folder holding it is a model
EVAL_JSON, EVAL_HTML = "eval.json", "eval.html"  # what `lorakit eval` writes into its output folder


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
        return Found(run.adapter, "adapter", run)
    if (run.model / MODEL_CONFIG).is_file():
        return Found(run.model, "model", run)
    # The adapter/ or model/ of a run folder, given directly, still belongs to its run.
    parent = RunFolder(p.parent) if p.name in ("adapter", "model") and RunFolder(p.parent).config.is_file() else None
    if (p / ADAPTER_CONFIG).is_file():
        return Found(p, "adapter", parent)
    if (p / MODEL_CONFIG).is_file():
        return Found(p, "model", parent)
    return None


def find_adapter(path: str | Path) -> Path | None:
    """The adapter folder at `path` (a run folder's adapter/, or `path` itself), or None."""
    found = locate(path)
    return found.path if found is not None and found.kind == "adapter" else None


def adapter_source(path: str | Path) -> Found:
    """The adapter at `path`, or one message saying why there is none."""
    found = locate(path)
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


def read_adapter(folder: str | Path) -> PeftConfig:
    """The adapter's own config as peft reads it (a `LoraConfig` for LoRA): rank, targets, base model…"""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError) as e:  # malformed JSON, an unknown peft_type, a wrong field type
        raise LorakitError(
            f"{Path(folder) / ADAPTER_CONFIG}: not a peft adapter config peft can read "
            f"({type(e).__name__}: {e}); save the adapter again with peft's save_pretrained"
        ) from None


def check_base(adapter: Any, base: str, *, force: bool, where: str | Path) -> None:
    """Refuse an adapter trained on another base: its weights would be meaningless on this one.

    `adapter` is its `PeftConfig`. The bases match when the adapter's `base_model_name_or_path` is the
    name given, the folder that name resolves to (the built-in alias, a local folder), or for the alias
    its hub id (model.same_base_names). An adapter
    that names no base is accepted; `force` accepts any (the same weights under another name).
    """
    from lorakit import model

    declared = getattr(adapter, "base_model_name_or_path", None)
    if not declared or force:
        return
    same = model.same_base_names(base)
    on_disk = {Path(s).resolve() for s in same if Path(s).exists()}
    if declared not in same and Path(declared).resolve() not in on_disk:
        raise LorakitError(
            f"{where} was trained on '{declared}', not on the base '{base}'; its answers would be "
            "meaningless on another base. Use the matching base model, or --force if they are the "
            "same weights under another name."
        )
