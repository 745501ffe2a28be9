"""Metrics of a run: always `metrics.jsonl`, optionally accelerate's trackers, and `loss.png` at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit import files
from lorakit.errors import LorakitError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(names: list[str], out: Path) -> None:
    """Fail before training, not after the first step, when a tracker's package is missing.

    Offline logs go into the run folder `out`, beside metrics.jsonl, not into the working folder.
    """
    import importlib.util

    for name in names:
        pkg = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(pkg if pkg != "tensorboard" else "tensorboard") is None:
            raise LorakitError(f"track: '{name}' needs the '{pkg}' package: pip install {pkg}")
    # Trackers must work without network: default the ones that phone home to their offline modes.
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out.resolve() / "mlruns").as_uri())


def append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per log event; appending keeps earlier lines safe if the run is killed."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps are about to run again."""
    kept = [r for r in read(path) if r.get("step", 0) <= step]
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot(records: list[dict], path: Path) -> None:
    """Train loss per step and eval loss at each evaluation, in one PNG; a preference run's (records with
    rewards_accuracy) beside its reward accuracy and margin, train and held-out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    preference = any("rewards_accuracy" in r for r in records)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    _lines(ax, records, "loss", "train loss", "eval_loss", "eval loss")
    ax.set_ylabel("loss (per pair or row)" if preference else "loss (per trained token)")
    if preference:
        right = axes[0][1]
        _lines(right, records, "rewards_accuracy", "reward accuracy", "eval_rewards_accuracy", "eval reward accuracy")
        _lines(right, records, "rewards_margin", "reward margin", "eval_rewards_margin", "eval reward margin")
        right.set_ylabel("reward accuracy (share) and margin")
    fig.tight_layout()
    with files.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _lines(ax: Any, records: list[dict], key: str, label: str, eval_key: str, eval_label: str) -> None:
    train = [(r["step"], r[key]) for r in records if key in r]
    ev = [(r["step"], r[eval_key]) for r in records if eval_key in r]
    if train:
        ax.plot(*zip(*train), label=label, lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label=eval_label)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
