"""What every request passes before a route reads it: the API key and the body size (`Guard`), and errors in
OpenAI's shape (`error_response`).

Light on purpose (no torch, no model code): the single-process app (app.py) and the router of replicated
serving (deployments.py), which only forwards requests, both put it in front of their routes.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from lorakit.serve import protocol as p
from lorakit.serve.metrics import Stats

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "server_error",
}


def is_public(path: str) -> bool:
    """The explorer page and its files (explorer.py) load without the API key; the page then asks for it, for the
    API calls."""
    return path == "/" or path.startswith("/ui/")


class Guard:
    """ASGI middleware: the API key on all but /health and the page, and the body size, before any route parses a
    request.

    The size is counted as the body arrives, so a chunked upload without Content-Length is stopped too.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, stats: Stats):
        self.app, self.api_key, self.max_body_bytes, self.stats = app, api_key, max_body_bytes, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if (
            self.api_key
            and scope["path"] != "/health"
            and not is_public(scope["path"])
            and not secrets.compare_digest(given, f"Bearer {self.api_key}".encode())
        ):
            self.stats.error(401)
            message = "invalid or missing API key (Authorization: Bearer KEY)"
            return await error_response(401, message)(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self.stats.error(413)
            return await error_response(413, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise StarletteHTTPException(413, f"request body over {self.max_body_bytes} bytes")
            return message

        return await self.app(scope, counted, send)


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
    """An error answer in OpenAI's shape: {"error": {message, type, param, code}}."""
    info = p.ErrorInfo(
        message=message, type=type_ or ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=status
    )
    return JSONResponse(p.ErrorResponse(error=info).model_dump(), status_code=status)
