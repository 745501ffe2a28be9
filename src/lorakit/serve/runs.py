"""What the explorer page shows of the run folders behind the served adapters: their config, loss curves,
summary, eval table and held-out examples. Read-only, and confined to the folders of adapters the server
already serves: a name that is not one of them reads nothing, and a file of a run folder is read only if it
lies inside that folder (`run_file`).

Each run is described on its own, from its files as they are: a file that is not what lorakit writes leaves its
part out with a note saying so, and a run that cannot be described at all is listed with its error, never
taking the other runs down with it. Nothing here reaches the network: held-out examples come from eval.json or
from data files on this machine, never from a hub dataset id. A description is kept until a file it was made
from changes, so the page's polls of unchanged runs read nothing again.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from lorakit import render, report, tracking
from lorakit.errors import LorakitError
from lorakit.run_folder import EVAL_HTML, RunFolder, locate

MAX_POINTS = 400  # loss-curve points sent to the page (a long run's metrics are thinned evenly)
MAX_EXAMPLES = 50
Stamp = tuple[str, int, int, int] | None  # where a file resolves to, its inode, mtime_ns and size; None: absent


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


@dataclass
class _Described:
    root: Path
    stamps: dict[Path, Stamp]  # every file the description was made from, as it was just before it was read
    described: dict[str, Any]


class Runs:
    """The served adapters' runs as the page shows them, each described again only once a file it was described
    from has changed (the page asks on every change of the model list, and rebuilding held-out examples reads a
    whole data set)."""

    def __init__(self) -> None:
        self._seen: dict[str, _Described] = {}
        self._lock = threading.Lock()  # requests run in worker threads

    def describe(self, adapters: dict[str, Path]) -> list[dict[str, Any]]:
        """Public name -> adapter folder, to the runs of those that came from a run folder, in that order."""
        with self._lock:
            self._seen = {name: seen for name, seen in self._seen.items() if name in adapters}
            described = [self._one(name, path) for name, path in adapters.items()]
        return [d for d in described if d is not None]

    def _one(self, name: str, adapter: Path) -> dict[str, Any] | None:
        run = run_of(adapter)
        if run is None:
            return None
        seen = self._seen.get(name)
        if seen is not None and seen.root == run.root and all(_stamp(p) == s for p, s in seen.stamps.items()):
            return seen.described
        files = _Files(run)
        try:
            described = _describe(name, run, files)
        except Exception as e:  # noqa: BLE001 - whatever one run's files hold, the other runs are still listed
            described = {"name": name, "folder": str(run.root), "error": _why(e, run, files)}
        self._seen[name] = _Described(run.root, files.stamps, described)
        return described


@dataclass
class _Files:
    """The files one description reads, each stamped just before it is read: a change after that is seen."""

    run: RunFolder
    stamps: dict[Path, Stamp] = field(default_factory=dict)
    last: Path | None = None

    def inside(self, path: Path) -> Path | None:
        """`path` to read, if it is a file inside the run folder (`run_file`)."""
        self.stamps[path], self.last = _stamp(path), path
        return run_file(self.run, path)

    def outside(self, paths: list[Path]) -> None:
        """Data files read from elsewhere on this machine (a folder's stamp changes when a file is added)."""
        self.stamps |= {p: _stamp(p) for p in paths}
        self.last = paths[0]


def _describe(name: str, run: RunFolder, files: _Files) -> dict[str, Any]:
    """One adapter's run for the page (LorakitError when its config.yaml cannot be read)."""
    cfg = _config(files.inside(run.config))
    notes: list[str] = []
    evals = _eval_json(files.inside(run.eval_json), notes)
    summary = _read_json(files.inside(run.summary), "summary.json", notes)
    if summary is not None and not isinstance(summary, dict):
        notes.append("summary.json: not an object as `lorakit train` writes it; left out")
        summary = None
    # Names may hold "/" (team/sql) or "#": one path segment, percent-encoded, that the route decodes again.
    html = f"/v1/lorakit/runs/{quote(name, safe='')}/{EVAL_HTML}"
    return {
        "name": name,
        "folder": str(run.root),
        "config": {k: cfg.get(k) for k in ("model", "method", "adapter", "data", "train")},
        "metrics": _metrics(files.inside(run.metrics), notes),
        "summary": summary,
        "eval": {"models": evals["models"], "html": html} if evals is not None else None,
        "examples": _eval_examples(evals) if evals is not None else _held_out(cfg, files, notes),
        "notes": notes,
    }


def eval_report(adapter: Path) -> str | None:
    """The eval report of an adapter's run as `lorakit eval` renders it from the run's eval.json, or None.

    Never the eval.html found in the folder: that file could be anything (a hand-written page with a script),
    while `report.to_html` escapes every string it takes from eval.json.
    """
    run = run_of(adapter)
    evals = _read_json(run_file(run, run.eval_json), "eval/eval.json", []) if run is not None else None
    try:
        return report.to_html(evals) if evals is not None else None
    except (KeyError, TypeError, AttributeError):  # an eval.json that `lorakit eval` did not write
        return None


def _config(path: Path | None) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise LorakitError(f"config.yaml: not readable as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise LorakitError(f"config.yaml: not a run config (it holds {json.dumps(cfg, default=str)[:40]}, not keys)")
    return cfg


def _eval_json(path: Path | None, notes: list[str]) -> dict[str, Any] | None:
    """eval.json, if it has what the page takes from it as `lorakit eval` writes it; else None with a note."""
    evals = _read_json(path, "eval/eval.json", notes)
    if evals is None:
        return None
    problem = _eval_problem(evals)
    if problem is not None:
        notes.append(f"eval/eval.json: {problem}; not as `lorakit eval` writes it, so the eval table is left out")
        return None
    return evals


def _eval_problem(evals: Any) -> str | None:
    if not isinstance(evals, dict):
        return f"not an object (it holds {json.dumps(evals)[:40]})"
    models, examples = evals.get("models"), evals.get("examples")
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        return "'models' is not an object of each model's metrics"
    if not isinstance(examples, list):
        return "'examples' is not a list"
    for i, ex in enumerate(examples[:MAX_EXAMPLES]):
        if not isinstance(ex, dict) or not _is_chat(ex.get("prompt")):
            return f"example {i + 1} has no 'prompt' (a list of chat messages with a role and a content)"
        if not isinstance(ex.get("reference"), str | None):
            return f"example {i + 1}'s 'reference' is not text"
    return None


def _is_chat(messages: Any) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )


def _eval_examples(evals: dict[str, Any]) -> list[dict]:
    return [{"prompt": ex["prompt"], "reference": ex.get("reference")} for ex in evals["examples"][:MAX_EXAMPLES]]


def _held_out(cfg: dict[str, Any], files: _Files, notes: list[str]) -> list[dict]:
    """With no eval.json, the run's held-out chats (prompt messages and reference answer) read again from its
    data, when that data is files on this machine (named relative to where the run was trained). Never a hub
    dataset id: fetching one to show a page would stall it on every poll of an offline server."""
    from lorakit import config, data, sources

    try:
        data_cfg = config.validate(cfg, "config.yaml").data
    except LorakitError:
        return []  # a config this lorakit no longer takes: the page still shows its keys
    source = data.held_out_source(data_cfg)
    local = sources.local_files(source) if source is not None else None
    if not local:
        return []
    files.outside([Path(source).expanduser(), *local])
    try:
        held = data.held_out(data_cfg).examples[:MAX_EXAMPLES]
    except (LorakitError, OSError, ValueError) as e:
        notes.append(f"held-out examples of {source}: {str(e).splitlines()[0]}")
        return []
    pairs = (render.split(ex.get("messages") or []) for ex in held)
    return [{"prompt": prompt, "reference": reference} for prompt, reference in pairs]


def _metrics(path: Path | None, notes: list[str]) -> list[dict]:
    """The loss curve's points; lines that are not a step's record (an object with a number `step`) are left out."""
    try:
        records = tracking.read(path) if path is not None else []
    except (OSError, ValueError) as e:  # also a line being appended right now: the next change reads it whole
        notes.append(f"metrics.jsonl: not JSON lines ({e}); the loss curve is left out")
        return []
    points = [
        {k: r[k] for k in ("step", "loss", "eval_loss") if _number(r.get(k))}
        for r in records
        if isinstance(r, dict) and _number(r.get("step"))
    ]
    if len(points) < len(records):
        notes.append(f"metrics.jsonl: {len(records) - len(points)} line(s) are not a step's record, left out")
    return _thin(points)


def _number(v: Any) -> bool:
    # A diverged run logs NaN losses: the chart has no place for them.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path | None, what: str, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError) as e:  # being rewritten, or not lorakit's: the page shows the rest
        notes.append(f"{what}: not readable as JSON ({e}); left out")
        return None


def _stamp(path: Path) -> Stamp:
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except (OSError, RuntimeError):  # absent, or a symlink loop
        return None
    return (str(resolved), st.st_ino, st.st_mtime_ns, st.st_size)


def _why(e: Exception, run: RunFolder, files: _Files) -> str:
    if isinstance(e, LorakitError):
        return str(e)
    last = files.last or run.root
    where = last.relative_to(run.root) if last.is_relative_to(run.root) else last  # data files lie elsewhere
    return f"could not be described ({type(e).__name__}: {e}); the last file read was {where}"


def _thin(points: list[dict]) -> list[dict]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    kept = [points[int(i * step)] for i in range(MAX_POINTS)]
    evals = [p for p in points if "eval_loss" in p and p not in kept]  # every evaluation stays
    return sorted(kept + evals, key=lambda p: p["step"])
