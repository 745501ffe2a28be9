"""OpenAI-compatible request and response models (the subset lorakit serves), plus vLLM's adapter bodies."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Req(BaseModel):
    # Clients send fields we do not use (logprobs, user, ...): accept and ignore them, as OpenAI does.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class SamplingFields(_Req):
    model: str
    max_tokens: int | None = Field(None, description="new tokens at most")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class LoadLoraRequest(_Req):
    lora_name: str
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
