"""HTTP routes: thin wrappers over `Serving`. `create_app` builds an app; there is no global one."""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import protocol as p
from lorakit.serve.serving import APIError, Serving

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error"}


def create_app(serving: Serving, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None)
    app.state.serving = serving

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        # Authentication and body size are checked before any route parses the request.
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer KEY)")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, f"request body over {max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "malformed request body",
                      param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(serving.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatCompletionRequest) -> Any:
        prompts = [serving.chat_prompt(req)]
        if req.stream:
            return _sse(serving.stream(req, serving.prepare(req, prompts), chat=True))
        return await serving.complete(req, prompts, chat=True)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest) -> Any:
        prompts = serving.text_prompts(req)
        if req.stream:
            return _sse(serving.stream(req, serving.prepare(req, prompts), chat=False))
        return await serving.complete(req, prompts, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load(req: p.LoadLoraRequest) -> PlainTextResponse:
        import asyncio

        # Loading reads files and waits for the model lock: keep it off the event loop.
        return PlainTextResponse(await asyncio.to_thread(serving.load_adapter, req))

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: p.UnloadLoraRequest) -> PlainTextResponse:
        import asyncio

        return PlainTextResponse(await asyncio.to_thread(serving.unload_adapter, req))

    return app


def _error(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, type_ or ERROR_TYPES.get(status, "invalid_request_error"), status, param),
                        status_code=status)


def _sse(chunks: Any) -> StreamingResponse:
    async def frames() -> Any:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")
