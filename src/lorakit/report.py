"""eval.html: the metrics table, then every example with the prompt, the reference and each model's answer
side by side. Examples whose answers differ between the base and an adapter are marked and can be
filtered, because those are the ones that tell what fine-tuning changed. One self-contained file.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lorakit import files

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222}
table.metrics{border-collapse:collapse;margin-bottom:18px}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
.example{border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 12px}
.example.changed{border-left:5px solid #e08a00}
.answers{display:grid;gap:8px;grid-template-columns:repeat(var(--n),1fr)}
.answer{background:#f6f6f6;border-radius:4px;padding:6px;white-space:pre-wrap}
.answer.ok{background:#e8f6e8}.answer.bad{background:#fbeaea}
pre{white-space:pre-wrap;margin:4px 0}.label{font-weight:600;color:#555}
"""
SCRIPT = """
document.getElementById('only-changed').addEventListener('change', e => {
  for (const ex of document.querySelectorAll('.example'))
    ex.style.display = e.target.checked && !ex.classList.contains('changed') ? 'none' : '';
});
"""


def write(path: Path, report: dict[str, Any]) -> None:
    """Render the report to `path` (atomically: a viewer never sees half a page)."""
    files.write_text(path, to_html(report))


def to_html(report: dict[str, Any]) -> str:
    models = list(report["models"])
    changed = sum(1 for ex in report["examples"] if is_changed(ex))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lorakit eval</title>",
        f"<style>{CSS}</style></head><body><h1>lorakit eval</h1>",
        _metrics_table(report["models"]),
    ]
    if report.get("preference"):  # what the preference columns of the table mean, and their reference
        parts.append(f"<p class='preference'>{html.escape(report['preference']['explained'])}</p>")
    if report.get("note"):
        parts.append(f"<p><em>{html.escape(report['note'])}</em></p>")
    parts.append(
        f"<p>{len(report['examples'])} examples, <b>{changed}</b> answered differently by the base and an "
        "adapter. <label><input type='checkbox' id='only-changed'> show only those</label></p>"
    )
    for ex in report["examples"]:
        parts.append(_example(ex, models))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def is_changed(ex: dict) -> bool:
    """Any adapter's answer differs from the base's (the base is the first model)."""
    outs = list(ex["outputs"].values())
    return any(o.strip() != outs[0].strip() for o in outs[1:])


def flat(scores: dict[str, Any]) -> dict[str, Any]:
    """One model's metrics as table columns: harness scores become `task:metric` (their stderr left out)."""
    out = {k: v for k, v in scores.items() if k != "harness"}
    for task, vals in (scores.get("harness") or {}).items():
        out |= {f"{task}:{m.removesuffix(',none')}": v for m, v in vals.items() if "stderr" not in m}
    return out


def _metrics_table(models: dict[str, dict]) -> str:
    table = {name: flat(v) for name, v in models.items()}
    keys = list(next(iter(table.values()), {}))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(v.get(k))}</td>" for k in keys) + "</tr>"
        for name, v in table.items()
    )
    return f"<table class='metrics'><tr><th>model</th>{head}</tr>{rows}</table>"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _example(ex: dict, models: list[str]) -> str:
    prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in ex["prompt"])
    cells = []
    for name in models:
        em = ex.get("scores", {}).get(name, {}).get("exact_match")
        cls = "" if em is None else (" ok" if em else " bad")
        cells.append(
            f"<div class='answer{cls}'><div class='label'>{html.escape(name)}</div>"
            f"{html.escape(ex['outputs'][name])}</div>"
        )
    reference = (
        ""
        if ex["reference"] is None
        else f"<div class='label'>reference</div><pre>{html.escape(ex['reference'])}</pre>"
    )
    ident = html.escape(str(ex["id"]))  # an int when lorakit wrote it; anything in an edited eval.json
    return (
        f"<div class='example{' changed' if is_changed(ex) else ''}' data-example='{ident}'>"
        f"<div class='label'>#{ident} prompt</div><pre>{html.escape(prompt)}</pre>{reference}"
        f"<div class='answers' style='--n:{len(models)}'>{''.join(cells)}</div></div>"
    )
