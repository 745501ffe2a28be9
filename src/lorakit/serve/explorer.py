"""The explorer: the web page `lorakit serve` answers at / (static files in ui/), and the JSON it reads
beside the OpenAI API: the served runs (`/v1/lorakit/runs`) and the server's state (`/v1/lorakit/state`).

The page itself asks the OpenAI-compatible API for its answers, so it shows exactly what API users get.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from lorakit.serve import runs
from lorakit.serve.serving import APIError, Serving

UI_FILES = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
# A run's eval report holds what its eval.json holds (anyone who can write the run folder wrote it): it runs
# sandboxed in an opaque origin, even when opened directly, so no script in it reaches the page's key or the API.
REPORT_HEADERS = {"Content-Security-Policy": "sandbox allow-scripts", "X-Content-Type-Options": "nosniff"}


def add_routes(app: FastAPI, serving: Serving) -> None:
    ui = resources.files("lorakit.serve") / "ui"

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((ui / "index.html").read_text(encoding="utf-8"))

    @app.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in UI_FILES:
            raise APIError(404, f"no {name} here", "not_found_error")
        return Response((ui / name).read_text(encoding="utf-8"), media_type=UI_FILES[name])

    described = runs.Runs()  # each run's description, kept while its files are unchanged

    @app.get("/v1/lorakit/runs")
    async def served_runs() -> dict:
        # Reading run folders is file work: off the event loop, which is decoding for other clients.
        return {"runs": await asyncio.to_thread(described.describe, _served(serving))}

    @app.get("/v1/lorakit/runs/{name:path}/eval.html")  # a path: adapter names may hold "/" (team/sql)
    async def eval_page(name: str) -> HTMLResponse:
        path = _adapter(serving, name)
        html = await asyncio.to_thread(runs.eval_report, path) if path is not None else None
        if html is None:
            raise APIError(
                404,
                f"no eval report for {name}: its run folder has no eval/eval.json written by `lorakit eval` "
                "(a symlink out of the folder is not followed); run `lorakit eval` on the run folder",
                "not_found_error",
            )
        return HTMLResponse(html, headers=REPORT_HEADERS)

    @app.get("/v1/lorakit/state")
    async def state() -> dict:
        described = serving.registry.describe()
        return {
            "base": serving.served_name,
            "queue_depth": serving.engine.depth(),
            "running_rows": serving.engine.running,
            "adapters_loaded": sum(1 for d in described.values() if d["loaded"]),
            "adapters_evicted": sum(1 for d in described.values() if not d["loaded"] and "error" not in d),
            "adapters_failed": sum(1 for d in described.values() if "error" in d),
            "max_model_len": serving.context,
            # What each model's chat requests are rendered with (an adapter's: the template it was trained with).
            "chat_templates": {
                serving.served_name: serving.registry.chat.template,
                **{n: d["chat_template"] for n, d in described.items() if "chat_template" in d},
            },
        }


def _adapter(serving: Serving, name: str) -> Path | None:
    known = serving.registry.known.get(name)  # only the folders the server already serves
    return known[0] if known is not None else None


def _served(serving: Serving) -> dict[str, Path]:
    """Each served adapter's folder (an adapter forgotten meanwhile is left out)."""
    paths = {name: _adapter(serving, name) for name in list(serving.registry.known)}
    return {name: path for name, path in paths.items() if path is not None}
