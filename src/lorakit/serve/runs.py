"""What the explorer page shows of the run folders behind the served adapters: their config, loss curves,
summary, eval table and held-out examples. Read-only, and confined to the folders of adapters the server
already serves: a name that is not one of them reads nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lorakit import tracking
from lorakit.errors import LorakitError
from lorakit.run_folder import EVAL_HTML, RunFolder, locate

MAX_POINTS = 400  # loss-curve points sent to the page (a long run's metrics are thinned evenly)
MAX_EXAMPLES = 50


def run_of(adapter: Path) -> RunFolder | None:
    """The `lorakit train` run folder an adapter folder belongs to (holding its config.yaml), if any."""
    found = locate(adapter)
    return found.run if found is not None and found.run is not None and found.run.config.is_file() else None


def describe(name: str, adapter: Path) -> dict[str, Any] | None:
    """One adapter's run for the page, or None when the adapter did not come from a run folder."""
    run = run_of(adapter)
    if run is None:
        return None
    cfg = yaml.safe_load(run.config.read_text()) or {}
    evals = _read_json(run.eval_json)
    return {
        "name": name,
        "folder": str(run.root),
        "config": {k: cfg.get(k) for k in ("model", "method", "adapter", "data", "train")},
        "metrics": _thin([{k: r[k] for k in ("step", "loss", "eval_loss") if k in r} for r in _records(run)]),
        "summary": _read_json(run.summary),
        "eval": {"models": evals["models"], "html": f"/v1/lorakit/runs/{name}/{EVAL_HTML}"} if evals else None,
        "examples": _examples(cfg, evals),
    }


def _records(run: RunFolder) -> list[dict]:
    try:
        return tracking.read(run.metrics)
    except (OSError, ValueError):  # a line being appended right now: the next poll reads it whole
        return []


def eval_html(adapter: Path) -> Path | None:
    """The eval.html of an adapter's run, if it has one (the only file of a run folder served as is)."""
    run = run_of(adapter)
    return run.eval_dir / EVAL_HTML if run is not None and (run.eval_dir / EVAL_HTML).is_file() else None


def _examples(cfg: dict, evals: dict | None) -> list[dict]:
    """Held-out chats (the prompt's messages and the reference answer): those eval scored, else the run's eval
    split read again (files are named relative to where the run was trained; unreadable ones give none)."""
    if evals:
        return [{"prompt": ex["prompt"], "reference": ex.get("reference")} for ex in evals["examples"][:MAX_EXAMPLES]]
    from lorakit import config, data

    try:
        held = data.held_out(config.validate(cfg).data).examples[:MAX_EXAMPLES]
    except (LorakitError, OSError):
        return []
    out = []
    for ex in held:
        messages = ex.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        answer = messages[last]["content"] if last < len(messages) else None
        out.append({"prompt": messages[:last], "reference": answer or None})
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # being rewritten, or not lorakit's: the page shows the rest
        return None


def _thin(points: list[dict]) -> list[dict]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    kept = [points[int(i * step)] for i in range(MAX_POINTS)]
    evals = [p for p in points if "eval_loss" in p and p not in kept]  # every evaluation stays
    return sorted(kept + evals, key=lambda p: p["step"])
