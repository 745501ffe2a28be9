"""The Ray Serve deployments of `lorakit serve --replicas` (replicas.py deploys them).

`Router`, the HTTP ingress (one light replica), reads each request's `model` and forwards the request whole
(method, path, headers, body) to `Engine` through a handle that names the model as Ray's multiplexed model id,
so Ray sends it to a replica that has that adapter loaded; a request for the base (or for no model) goes to any
replica. `Engine` replicas, which Ray adds and removes with the requests in flight, each build lorakit's own
app (`server.build`), watch the same --adapters-dir, and run each forwarded request through that app in
process, streaming its answer back chunk by chunk. Every second each replica reports its adapter versions and
its /metrics to the router, which answers /metrics (the replicas' summed) and /v1/lorakit/replicas itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

import ray
from ray import serve
from starlette import routing
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from lorakit.options import ServeOptions
from lorakit.serve import metrics, server, threads
from lorakit.serve.guard import Guard, error_response
from lorakit.serve.metrics import Stats

log = logging.getLogger("lorakit.serve")
APP = "lorakit"  # the Ray Serve application's name
REPORT_S = 1.0  # how often a replica reports its adapters and counters to the router
GONE_S = 10 * REPORT_S  # a replica not heard from for this long is gone (its counters stay in the totals)
REPLICA_HEADER = b"x-lorakit-replica"  # which replica answered: every forwarded response carries it


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress()
class Router:
    """The HTTP ingress: forwards each request to an Engine replica, and answers /metrics for all of them.

    It only reads bodies and passes bytes on, so one replica with no CPU of its own keeps up; it holds requests
    while they wait for an Engine replica (that queue is what Ray scales on), hence the high max_ongoing_requests.
    """

    def __init__(self, engine, opts: ServeOptions):
        self.engine, self.opts = engine, opts
        self.base = opts.served_model_name or opts.model
        self.stats = Stats()  # the requests refused here (API key, body size)
        self.reports: dict[str, tuple[float, dict]] = {}  # replica -> (when heard, its last report)
        self.departed = ""  # the counters of replicas gone

    def __serve_build_asgi_app__(self):
        refused = "with --replicas, each replica loads adapters from --adapters-dir (--watch): put the adapter there"
        routes = [
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/lorakit/replicas", self.replicas, methods=["GET"]),
            Route("/v1/load_lora_adapter", error_response(400, refused), methods=["POST"]),
            Route("/v1/unload_lora_adapter", error_response(400, refused), methods=["POST"]),
        ]
        # Every other request goes to an Engine replica (routing.Router's default: what no route matched).
        app = routing.Router(routes, default=self.forward)
        return Guard(app, self.opts.api_key, self.opts.max_body_bytes, self.stats)

    async def forward(self, scope, receive, send) -> None:
        try:
            body = await _body(receive)
        except HTTPException as e:  # over --max-body-bytes while it arrived (Guard's count)
            await error_response(e.status_code, e.detail)(scope, receive, send)
            return
        model = _model(body) if scope["method"] == "POST" else None
        handle = self.engine.options(stream=True, multiplexed_model_id=model if model and model != self.base else "")
        parts = handle.forward.remote(scope["method"], scope["path"], scope["query_string"], scope["headers"], body)
        async for part in parts:
            if isinstance(part, dict):
                await send({"type": "http.response.start", **part})
            else:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def report(self, replica: str, report: dict, last: bool = False) -> None:
        """A replica's adapters and metrics; last: it is leaving (its counters stay in the totals)."""
        self.reports[replica] = (time.monotonic(), report)
        if last:
            self._depart(replica)

    def _depart(self, replica: str) -> None:
        _, last = self.reports.pop(replica, (0.0, None))
        if last is not None:
            self.departed = metrics.summed([self.departed, metrics.counters(last["metrics"])], 0)

    def _live(self) -> dict[str, dict]:
        for replica, (heard, _) in list(self.reports.items()):
            if time.monotonic() - heard > GONE_S:  # it died without a word
                self._depart(replica)
        return {replica: report for replica, (_, report) in self.reports.items()}

    async def metrics(self, _: Request) -> PlainTextResponse:
        live = self._live()
        texts = [r["metrics"] for r in live.values()] + [metrics.counters(self.departed), self.stats.requests()]
        return PlainTextResponse(metrics.summed(texts, len(live)), media_type="text/plain; version=0.0.4")

    async def replicas(self, _: Request) -> JSONResponse:
        """Each live replica's last report: its adapters, {name: {fingerprint, loaded}} (the fingerprint changes
        with the files), its /metrics, and how long ago it sent them."""
        self._live()
        now = time.monotonic()
        return JSONResponse(
            {"replicas": {r: {**report, "reported_s_ago": now - t} for r, (t, report) in self.reports.items()}}
        )


@serve.deployment
class Engine:
    """One replica: lorakit's own app (base, adapters, batching engine) in this Ray actor."""

    async def __init__(self, opts: ServeOptions):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # The CPUs Ray gave this replica, not every core of the node (other replicas share it), unless --threads
        # says; set before torch loads (in build), as the single-process server does.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        threads.apply(opts.threads or max(1, int(cpus)))
        self.app, self.serving = server.build(opts)
        # build scanned --adapters-dir once; --watch rescans it, in every replica.
        self.watcher = None
        if opts.watch:
            self.watcher = server.watch(self.serving, Path(opts.adapters_dir), opts.watch_interval_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.router = serve.get_deployment_handle("Router", app_name=APP)
        self.reporting = asyncio.get_running_loop().create_task(self._report_every_second())

    @serve.multiplexed(max_num_models_per_replica=-1)  # how many stay loaded is the registry's (--max-adapters)
    async def adapter(self, name: str) -> str:
        """Load `name` here if it is not (KeyError for a name nobody serves); Ray then routes its requests here."""
        version = await asyncio.to_thread(self.serving.registry.acquire, name)
        self.serving.registry.release(version)
        return name

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
        """The response to one request the router forwarded: its start ({status, headers}), then body chunks."""
        if model := serve.get_multiplexed_model_id():
            with suppress(Exception):  # the app answers it in OpenAI's shape: 404 unknown, 500 unloadable
                await self.adapter(model)
        async for part in _through(self.app, method, path, query, headers, body):
            if isinstance(part, dict):
                part = {**part, "headers": [*part["headers"], (REPLICA_HEADER, self.replica.encode())]}
            yield part

    def state(self) -> dict:
        """This replica's adapters: {name: {fingerprint, loaded}}, and its /metrics text."""
        registry = self.serving.registry
        adapters = {n: {"fingerprint": fp, "loaded": n in registry.active} for n, (_, _, fp) in registry.known.items()}
        return {"adapters": adapters, "metrics": self.serving.stats.prometheus(self.serving.engine, registry)}

    async def _report_every_second(self) -> None:
        while True:
            try:
                await self.router.report.remote(self.replica, self.state())
            except Exception as e:  # noqa: BLE001 - the router restarting: the next report reaches it
                log.warning("replica %s could not report to the router: %s", self.replica, e)
            await asyncio.sleep(REPORT_S)

    async def __del__(self):
        self.reporting.cancel()
        if self.watcher is not None:
            self.watcher.stop.set()
        with suppress(Exception):  # the router may be gone first (the whole application stopping)
            await asyncio.wait_for(self.router.report.remote(self.replica, self.state(), last=True), REPORT_S)
        self.serving.close()


async def _through(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
    """Run one HTTP request through the ASGI `app` in this process: yields the response's start ({status,
    headers}), then each body chunk as the app sends it. Closing the iterator early is the client leaving: the
    app sees http.disconnect, and its work is cancelled."""
    sent, left, out = False, asyncio.Event(), asyncio.Queue()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": None,
        "server": None,
    }
    task = asyncio.create_task(app(scope, receive, out.put))
    task.add_done_callback(lambda _: out.put_nowait(None))
    complete = False
    try:
        while not complete and (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                complete = not message.get("more_body")
        await task  # it ends by itself once it answered; or its error
        if not complete:
            raise RuntimeError(f"{method} {path}: lorakit's app ended without a complete response")
    finally:
        if not task.done():  # the client left (the router closed this iterator): stop the app's work
            left.set()
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _model(body: bytes) -> str | None:
    """The request's `model` field, if its body is a JSON object with one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else None
