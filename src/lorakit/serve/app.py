"""HTTP routes: thin wrappers that hand requests to `Serving` and its response models back as JSON or SSE.

`create_app` builds an app; there is no global one. Errors of any kind leave in OpenAI's shape and are
counted by status for /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import explorer
from lorakit.serve import protocol as p
from lorakit.serve.guard import Guard, error_response
from lorakit.serve.serving import APIError, Serving

log = logging.getLogger("lorakit.serve")


def create_app(serving: Serving, api_key: str | None = None, max_body_bytes: int = 1 << 20, ui: bool = True) -> FastAPI:
    """The HTTP app of `serving`; ui: the explorer page at / (explorer.py)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        serving.close()

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = serving
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, stats=serving.stats)

    def error(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
        serving.stats.error(status)
        if status >= 500:  # the client sees the message; the operator must see it too
            log.error("answered %d: %s", status, message)
        return error_response(status, message, type_, param)

    @app.exception_handler(APIError)
    async def apierror_response(_: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if not where and first.get("type") not in ("value_error", "missing"):  # a body that is not an object
            message = "malformed request body: send a JSON object"
        return error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = serving.stats.prometheus(serving.engine, serving.registry)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(serving.models().model_dump())

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatCompletionRequest, request: Request) -> Response:
        return _respond(await serving.chat(req, gone=lambda: _disconnected(request)))

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request) -> Response:
        return _respond(await serving.completions(req, gone=lambda: _disconnected(request)))

    @app.post("/v1/load_lora_adapter")
    async def load(req: p.LoadLoraRequest) -> PlainTextResponse:
        # Loading reads files and waits for the model lock: keep it off the event loop.
        return PlainTextResponse(await asyncio.to_thread(serving.load_adapter, req))

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: p.UnloadLoraRequest) -> PlainTextResponse:
        return PlainTextResponse(await asyncio.to_thread(serving.unload_adapter, req))

    if ui:
        explorer.add_routes(app, serving)
    return app


async def _disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the server's ASGI http.disconnect message).

    The body was read already, so the next message the server sends is that one (or none at all).
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _respond(result: BaseModel | AsyncIterator[BaseModel]) -> JSONResponse | StreamingResponse:
    """A response model as JSON, or a stream of chunk models as server-sent events ending with [DONE]."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())

    async def frames() -> AsyncIterator[str]:
        async for chunk in result:
            yield f"data: {json.dumps(chunk.model_dump())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")
