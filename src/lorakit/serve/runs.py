"""What the explorer page shows of the run folders behind the served adapters: their config, loss curves,
summary, eval table and held-out examples. Read-only, and confined to the folders of adapters the server
already serves: a name that is not one of them reads nothing, and a file of a run folder is read only if it
lies inside that folder (`run_file`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from lorakit import render, report, tracking
from lorakit.errors import LorakitError
from lorakit.run_folder import EVAL_HTML, RunFolder, locate

MAX_POINTS = 400  # loss-curve points sent to the page (a long run's metrics are thinned evenly)
MAX_EXAMPLES = 50


def run_file(run: RunFolder, path: Path) -> Path | None:
    """`path` resolved, if it is a file inside the run folder; else None, as if it were not there.

    The run folder is all the page may read: no `..` and no symlink out of it (as `Registry.check_path` keeps
    run-time loads inside --adapters-dir), or a link in an uploaded run would hand out any file the server
    can read. Callers read the resolved path, not the link, so the file checked is the file read.
    """
    resolved = path.resolve()
    return resolved if resolved.is_file() and run.root.resolve() in resolved.parents else None


def run_of(adapter: Path) -> RunFolder | None:
    """The `lorakit train` run folder an adapter folder belongs to (holding its config.yaml), if any."""
    found = locate(adapter)
    run = found.run if found is not None else None
    return run if run is not None and run_file(run, run.config) is not None else None


def describe(name: str, adapter: Path) -> dict[str, Any] | None:
    """One adapter's run for the page, or None when the adapter did not come from a run folder."""
    run = run_of(adapter)
    config = run_file(run, run.config) if run is not None else None
    if config is None:
        return None
    cfg = yaml.safe_load(config.read_text()) or {}
    evals = _read_json(run_file(run, run.eval_json))
    # Names may hold "/" (team/sql) or "#": one path segment, percent-encoded, that the route decodes again.
    html = f"/v1/lorakit/runs/{quote(name, safe='')}/{EVAL_HTML}"
    return {
        "name": name,
        "folder": str(run.root),
        "config": {k: cfg.get(k) for k in ("model", "method", "adapter", "data", "train")},
        "metrics": _thin([{k: r[k] for k in ("step", "loss", "eval_loss") if k in r} for r in _records(run)]),
        "summary": _read_json(run_file(run, run.summary)),
        "eval": {"models": evals["models"], "html": html} if evals else None,
        "examples": _examples(cfg, evals),
    }


def _records(run: RunFolder) -> list[dict]:
    metrics = run_file(run, run.metrics)
    try:
        return tracking.read(metrics) if metrics is not None else []
    except (OSError, ValueError):  # a line being appended right now: the next poll reads it whole
        return []


def eval_report(adapter: Path) -> str | None:
    """The eval report of an adapter's run as `lorakit eval` renders it from the run's eval.json, or None.

    Never the eval.html found in the folder: that file could be anything (a hand-written page with a script),
    while `report.to_html` escapes every string it takes from eval.json.
    """
    run = run_of(adapter)
    evals = _read_json(run_file(run, run.eval_json)) if run is not None else None
    try:
        return report.to_html(evals) if evals is not None else None
    except (KeyError, TypeError, AttributeError):  # an eval.json that `lorakit eval` did not write
        return None


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
    pairs = (render.split(ex.get("messages") or []) for ex in held)
    return [{"prompt": prompt, "reference": reference} for prompt, reference in pairs]


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):  # being rewritten, or not lorakit's: the page shows the rest
        return None


def _thin(points: list[dict]) -> list[dict]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    kept = [points[int(i * step)] for i in range(MAX_POINTS)]
    evals = [p for p in points if "eval_loss" in p and p not in kept]  # every evaluation stays
    return sorted(kept + evals, key=lambda p: p["step"])
