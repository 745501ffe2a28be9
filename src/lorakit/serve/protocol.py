"""The API's bodies as pydantic models: OpenAI-compatible requests and responses, vLLM's adapter requests, errors.

As in vLLM's vllm/entrypoints/openai/protocol.py. Requests accept fields lorakit does not use (OpenAI's API
does) but refuse the ones that would change the answer; responses serialize to the JSON shapes OpenAI sends.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# Fields that change what a completion means; ignoring them silently would return a wrong answer. Their
# "off" values (false, 0, 1, [], {}, null) are fine: clients often send those.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "echo",
    "tools",
    "functions",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "suffix",
)
SEED_MAX = 2**63 - 1 - 8  # torch seeds are signed 64-bit; n <= 8 rows use seed, seed + 1, ...


def _unicode(v: Any) -> Any:
    """`v` (a text, or a list of texts or TextParts) if its texts are Unicode a tokenizer can encode.

    JSON's escapes let a body carry a lone surrogate ("\\ud800"), which no UTF-8 text holds: tokenizers refuse it
    with a TypeError, and an error message echoing it cannot be sent. A 400 here instead, for every text field.
    """
    for s in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
        s = s.text if isinstance(s, TextPart) else s  # checked here: a TextPart's own error would read "not a str"
        if isinstance(s, str):
            try:
                s.encode()
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"not valid Unicode text: a lone surrogate ({s[e.start]!a}) at character {e.start}"
                ) from None
    return v


Unicode = AfterValidator(_unicode)


class _Req(BaseModel):
    # Clients send fields we do not use (user, metadata, ...): accept and ignore them, as OpenAI does.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None, Unicode] = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it; `developer` is OpenAI's newer name for `system`."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Req):
    model: Annotated[str, Unicode]
    max_tokens: int | None = Field(None, description="new tokens at most")
    # OpenAI's API takes null for these, meaning the default.
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Annotated[str | list[str] | None, Unicode] = None
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(
        False, description="vLLM's: the end-of-turn and EOS tokens do not end the answer (max_tokens, stop strings do)"
    )

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
    prompt: Annotated[str | list[str], Unicode]


class LoadLoraRequest(_Req):
    lora_name: Annotated[str, Unicode] = Field(min_length=1, max_length=200)
    lora_path: Annotated[str, Unicode]


class UnloadLoraRequest(_Req):
    lora_name: Annotated[str, Unicode]


# ---- responses ----
class _Body(BaseModel):
    """A response body. OpenAI leaves some fields out rather than sending null (`usage` on a stream's text
    chunks, an empty `delta`): those are named in `optional` and sent only when given. Every other field is
    always sent, null ones (`finish_reason`, `logprobs`, `parent`) included, so exclude_unset would not do."""

    optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k not in self.optional or k in self.model_fields_set}


class UsageInfo(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(_Body):
    """One entry of /v1/models: the base (with max_model_len) or an adapter (its parent is the base)."""

    optional = frozenset({"max_model_len", "path", "loaded", "version", "loaded_at", "chat_template", "error"})
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str | None  # vLLM's meaning: what the model was loaded from (an adapter's folder)
    parent: str | None
    max_model_len: int | None = None
    # An adapter's registry entry: its folder, whether it is in memory now, the version serving it, why it failed.
    path: str | None = None
    loaded: bool | None = None
    version: str | None = None
    loaded_at: int | None = None  # when the version serving it went live (unix time)
    # The chat template its chat requests are rendered with (`render.template_name`): "base" (the base model's
    # own), a fallback's name (chatml, llama2…), "custom" (another one saved with the adapter).
    chat_template: str | None = None
    error: str | None = None


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatCompletionMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(_Body):
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None
    logprobs: None = None  # requests asking for logprobs are refused, so always null


class ChatCompletionResponse(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(_Body):
    """The new part of a streamed message: role and "" first, then text; {} on a finishing chunk without text."""

    optional = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(_Body):
    index: int
    delta: DeltaMessage
    finish_reason: str | None  # null until the row's last chunk


class ChatCompletionStreamResponse(_Body):
    optional = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None  # only on the last chunk, whose choices are [] (stream_options.include_usage)


class CompletionResponseChoice(_Body):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(_Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(_Body):
    index: int
    text: str
    finish_reason: str | None  # null until the row's last chunk
    logprobs: None = None


class CompletionStreamResponse(_Body):
    optional = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"  # OpenAI's chunks keep the response's name
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ErrorInfo(_Body):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status


class ErrorResponse(_Body):
    """OpenAI's error shape: the official client maps the status code to its exception class, and raises a
    streamed one too."""

    error: ErrorInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
