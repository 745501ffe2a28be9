"""OpenAI-compatible request models (the subset lorakit serves), vLLM's adapter bodies, and the error shape."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fields that change what a completion means; ignoring them silently would return a wrong answer. Their
# "off" values (false, 0, 1, [], {}, null) are fine: clients often send those.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "tools", "functions", "logit_bias", "presence_penalty",
               "frequency_penalty", "suffix")
SEED_MAX = 2**63 - 1 - 8  # torch seeds are signed 64-bit; n <= 8 rows use seed, seed + 1, ...


class _Req(BaseModel):
    # Clients send fields we do not use (user, metadata, ...): accept and ignore them, as OpenAI does.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def render(self) -> dict[str, str]:
        """The message as chat templates expect it; `developer` is OpenAI's newer name for `system`."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Req):
    model: str
    max_tokens: int | None = Field(None, description="new tokens at most")
    # OpenAI's API takes null for these, meaning the default.
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in ("temperature", "top_p", "n", "stream"))}
        return data

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @model_validator(mode="after")
    def _supported(self) -> SamplingFields:
        extra: dict[str, Any] = self.model_extra or {}
        used = [k for k in UNSUPPORTED if extra.get(k) not in (None, False, 0, [], {})]
        if (extra.get("best_of") or 1) != 1:
            used.append("best_of")
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":  # json_object / json_schema: not enforced
            used.append(f"response_format {fmt.get('type')}")
        if used:
            raise ValueError(f"not supported by lorakit serve: {', '.join(used)}")
        return self

    def stops(self) -> list[str]:
        # An empty stop string would match at once and end every completion before its first token.
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class LoadLoraRequest(_Req):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str


class UnloadLoraRequest(_Req):
    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    """OpenAI's error shape: the official client maps the status code to its exception class."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
