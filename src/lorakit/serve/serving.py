"""The request logic of the OpenAI-compatible API, testable without HTTP: request models in, response models out.

A completion is a response model, or (stream=True) an async iterator of chunk models; the engine decodes,
the registry holds the adapters, app.py turns the models into HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Any

from lorakit import render
from lorakit.serve import protocol as p
from lorakit.serve.adapters import Admission, Chat, NameTaken, Registry
from lorakit.serve.engine import Engine, Job
from lorakit.serve.metrics import Stats

log = logging.getLogger("lorakit.serve")
Gone = Callable[[], Awaitable[None]]  # returns once the client has disconnected
MAX_ROWS = 64  # completions (prompts x n) in one request: one client cannot queue unbounded work


class APIError(Exception):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class Serving:
    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        served_name: str,
        *,
        adapters_dir: Path | None = None,
        max_adapters: int | None = None,
        max_batch: int = 8,
        window_s: float = 0.01,
        per_row_adapters: bool = True,
        max_tokens_limit: int = 1024,
        max_model_len: int | None = None,
        default_max_tokens: int = 256,
        base_name: str | None = None,
        force: bool = False,
        quantization: str | None = None,
    ):
        self.tokenizer, self.served_name = tokenizer, served_name
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.context = max_model_len or int(getattr(base_model.config, "max_position_embeddings", 2048))
        lock = threading.Lock()
        admission = Admission(served_name, base_name, per_row_adapters, force, quantization)
        chat = Chat.of(tokenizer, base_model.generation_config, tokenizer.chat_template)
        self.registry = Registry(base_model.eval(), lock, chat, adapters_dir, max_adapters, admission)
        eos_ids = sorted(chat.stop_ids)  # a row's own stop ids (its adapter's) replace these
        self.engine = Engine(lambda: self.registry.net, tokenizer, eos_ids, max_batch, window_s, lock, per_row_adapters)
        self.stats = Stats()
        self.started = p.now()

    def close(self) -> None:
        self.engine.close()

    # ---- models ----
    def models(self) -> p.ModelList:
        data = [
            p.ModelCard(
                id=self.served_name,
                created=self.started,
                root=self.served_name,
                parent=None,
                max_model_len=self.context,
                chat_template=self.registry.chat.template,
            )
        ]
        for name, info in self.registry.describe().items():
            if name == self.served_name:  # a folder named like the base, refused: the id is the base's
                continue
            data.append(p.ModelCard(id=name, created=self.started, root=info["path"], parent=self.served_name, **info))
        return p.ModelList(data=data)

    def load_adapter(self, req: p.LoadLoraRequest) -> str:
        try:
            self.registry.load(req.lora_name, req.lora_path)
        except PermissionError as e:
            raise APIError(403, str(e), "permission_error", "lora_path") from None
        except FileNotFoundError as e:
            raise APIError(404, str(e), "not_found_error", "lora_path") from None
        except NameTaken as e:
            raise APIError(400, str(e), param="lora_name") from None
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload_adapter(self, req: p.UnloadLoraRequest) -> str:
        try:
            self.registry.unload(req.lora_name)
        except KeyError:
            raise APIError(
                404, f"The lora adapter '{req.lora_name}' cannot be found.", "not_found_error", "lora_name"
            ) from None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    # ---- completions ----
    async def chat(
        self, req: p.ChatCompletionRequest, gone: Gone | None = None
    ) -> p.ChatCompletionResponse | AsyncIterator[p.ChatCompletionStreamResponse | p.ErrorResponse]:
        """A chat.completion, or (stream=True) an iterator of its chunks.

        gone: returns once the client has left; a non-streamed request then stops its rows (a stream
        stops when its consumer does).
        """
        jobs = await asyncio.to_thread(self.chat_jobs, req)  # may load an evicted adapter: not on the event loop
        return self.stream(req, jobs, chat=True) if req.stream else await self.complete(req, jobs, True, gone)

    async def completions(
        self, req: p.CompletionRequest, gone: Gone | None = None
    ) -> p.CompletionResponse | AsyncIterator[p.CompletionStreamResponse | p.ErrorResponse]:
        """A text_completion, or (stream=True) an iterator of its chunks."""
        prompts = self.text_prompts(req)
        jobs = await asyncio.to_thread(self.prepare, req, lambda chat: prompts)
        return self.stream(req, jobs, chat=False) if req.stream else await self.complete(req, jobs, False, gone)

    def chat_jobs(self, req: p.ChatCompletionRequest) -> list[Job]:
        """The rows of a chat request, its messages rendered with the template of the version it pins."""
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        return self.prepare(req, lambda chat: [self.chat_prompt(req, chat)])

    def chat_prompt(self, req: p.ChatCompletionRequest, chat: Chat) -> list[int]:
        """The request's messages as prompt ids, in the template of the model (base or adapter version) it runs on."""
        if chat.template is None:
            raise APIError(
                400,
                f"{req.model} has no chat template (a base model without one, or an adapter saved without its "
                "tokenizer): send text to /v1/completions, or chat with an adapter trained with a data.chat_template",
                param="messages",
            )
        try:
            return render.prompt_ids(chat.tokenizer, [m.for_template() for m in req.messages])
        except Exception as e:  # noqa: BLE001 - a template that rejects these roles (must alternate...)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None

    def text_prompts(self, req: p.CompletionRequest) -> list[list[int]]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        # An empty prompt is valid (as in OpenAI's API): the model starts from its BOS token, else from EOS,
        # the document separator of models without one (GPT-2 style).
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        return [self.tokenizer(s)["input_ids"] or [start] for s in prompts]

    def prepare(self, req: p.SamplingFields, prompts_of: Callable[[Chat], list[list[int]]]) -> list[Job]:
        """Pin the model version the request runs on, render its prompts with that version's template, check
        limits, and make its rows (prompts x n), each stopping at that version's end-of-turn ids."""
        if req.n > MAX_ROWS:  # checked again below, once the prompts are known
            raise APIError(400, f"n={req.n} is over {MAX_ROWS} completions in one request; lower it", param="n")
        version = self._pin(req.model)
        chat = version.chat if version else self.registry.chat
        try:
            jobs = self._jobs(req, prompts_of(chat), version, chat)
        except BaseException:
            if version is not None:
                self.registry.release(version)
            raise
        if version is not None:
            self.registry.share(version, len(jobs) - 1)  # each row releases the version once when it ends
        return jobs

    def _jobs(self, req: p.SamplingFields, prompts: list[list[int]], version: Any, chat: Chat) -> list[Job]:
        if len(prompts) * req.n > MAX_ROWS:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={req.n} is over {MAX_ROWS} completions in one request; split it",
                param="prompt",
            )
        given = req.max_tokens is not None
        max_tokens = req.max_tokens if given else min(self.default_max_tokens, self.max_tokens_limit)
        if max_tokens <= 0 or max_tokens > self.max_tokens_limit:
            raise APIError(
                400, f"max_tokens must be between 1 and {self.max_tokens_limit}, got {max_tokens}", param="max_tokens"
            )
        budgets = []
        for ids in prompts:
            room = self.context - len(ids)
            # Without max_tokens the answer may run to the end of the context, as in OpenAI's API.
            budget = max_tokens if given else min(max_tokens, room)
            if budget < 1 or len(ids) + budget > self.context:
                asked = f" + max_tokens ({max_tokens})" if given else ""
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context} tokens: the prompt "
                    f"({len(ids)} tokens){asked} is over it",
                    param="messages",
                )
            budgets.append(budget)
        release = (lambda: self.registry.release(version)) if version else lambda: None
        return [
            Job(
                ids,
                version.internal if version else None,
                budget,
                req.temperature,
                req.top_p,
                req.stops(),
                None if req.seed is None else req.seed + i,
                release=release,
                # ignore_eos (vLLM's): no end-of-turn or EOS id ends the answer; max_tokens and stop strings do.
                stop_ids=frozenset() if req.ignore_eos else chat.stop_ids,
            )
            for ids, budget in zip(prompts, budgets)
            for i in range(req.n)
        ]

    def _pin(self, model: str) -> Any:
        if model == self.served_name:
            return None
        try:
            return self.registry.acquire(model)
        except KeyError:
            if model in self.registry.errors:  # a folder of the adapters dir that could not be loaded
                raise APIError(
                    404, f"adapter {model} is not loaded: {self.registry.errors[model]}", "not_found_error", "model"
                ) from None
            raise APIError(
                404,
                f"The model `{model}` does not exist. Known models: {[self.served_name, *self.registry.known]}",
                "not_found_error",
                "model",
            ) from None
        except FileNotFoundError as e:  # evicted, then deleted: the registry forgot it
            raise APIError(404, f"adapter {model} was removed: {e}", "not_found_error", "model") from None
        except (ValueError, OSError) as e:  # evicted, and its files have changed into something unloadable
            raise APIError(500, f"adapter {model} could not be loaded again: {e}", "server_error", "model") from None

    async def run(self, jobs: list[Job]) -> AsyncIterator[tuple[int, str, bool, str | None]]:
        """Submit jobs and yield (row, delta_text, finished, finish_reason) as the engine produces them.

        Leaving early (the client went away) cancels the rows still running.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(i: int, text: str, done: bool, reason: str | None) -> None:
            # A closed loop raises RuntimeError: its client is gone, and the row is (being) cancelled.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, (i, text, done, reason))

        for i, job in enumerate(jobs):
            job.emit = lambda text, done, reason, i=i: emit(i, text, done, reason)
            self.engine.submit(job)
        remaining = len(jobs)
        try:
            while remaining:
                item = await events.get()
                remaining -= item[2]
                yield item
        finally:
            for job in jobs:
                job.cancelled = job.finish_reason is None

    async def complete(
        self, req: p.SamplingFields, jobs: list[Job], chat: bool, gone: Gone | None = None
    ) -> p.ChatCompletionResponse | p.CompletionResponse:
        t0 = time.perf_counter()
        texts = [""] * len(jobs)
        reasons: list[str | None] = [None] * len(jobs)

        async def collect() -> None:
            async with aclosing(self.run(jobs)) as events:
                async for i, delta, done, reason in events:
                    texts[i] += delta
                    if done:
                        reasons[i] = reason

        work = asyncio.ensure_future(collect())
        if gone is not None:
            left = asyncio.ensure_future(gone())
            try:
                await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
            if not work.done():  # nobody waits for this answer: stop its rows (run() cancels them on exit)
                work.cancel()
                with suppress(asyncio.CancelledError):
                    await work
                raise APIError(499, "the client closed the connection before the answer was ready", "client_closed")
        await work
        failed = [j.error for j in jobs if j.error]
        if failed:
            raise APIError(500, f"generation failed: {failed[0]}", "server_error")
        self._count(req.model, jobs, time.perf_counter() - t0)
        answers, usage = enumerate(zip(texts, reasons)), self._usage(req, jobs)
        if chat:
            return p.ChatCompletionResponse(
                id=p.new_id("chatcmpl"),
                created=p.now(),
                model=req.model,
                usage=usage,
                choices=[
                    p.ChatCompletionResponseChoice(index=i, message=p.ChatCompletionMessage(content=t), finish_reason=r)
                    for i, (t, r) in answers
                ],
            )
        return p.CompletionResponse(
            id=p.new_id("cmpl"),
            created=p.now(),
            model=req.model,
            usage=usage,
            choices=[p.CompletionResponseChoice(index=i, text=t, finish_reason=r) for i, (t, r) in answers],
        )

    async def stream(
        self, req: p.SamplingFields, jobs: list[Job], chat: bool
    ) -> AsyncIterator[p.ChatCompletionStreamResponse | p.CompletionStreamResponse | p.ErrorResponse]:
        """OpenAI stream chunks; the caller frames them as SSE and ends with [DONE]. A failure mid-stream is
        one chunk in OpenAI's error shape (the openai client raises it)."""
        t0 = time.perf_counter()
        chunk = p.ChatCompletionStreamResponse if chat else p.CompletionStreamResponse
        head = {"id": p.new_id("chatcmpl" if chat else "cmpl"), "created": p.now(), "model": req.model}
        submitted = False
        try:
            if chat:
                for i in range(len(jobs)):  # each row opens with its role, as OpenAI's streams do
                    start = p.DeltaMessage(role="assistant", content="")
                    choice = p.ChatCompletionResponseStreamChoice(index=i, delta=start, finish_reason=None)
                    yield chunk(**head, choices=[choice])
            submitted = True  # from here on the engine releases each row's adapter version
        finally:
            if not submitted:  # the client left during the role chunks: the rows never reached the engine
                for job in jobs:
                    job.release()
        async with aclosing(self.run(jobs)) as events:
            async for i, delta, done, reason in events:
                if jobs[i].error:
                    self.stats.error(500)
                    log.error("answered 500 in a stream: generation failed: %s", jobs[i].error)
                    yield p.ErrorResponse(
                        error=p.ErrorInfo(message=f"generation failed: {jobs[i].error}", type="server_error", code=500)
                    )
                    return
                if not delta and not done:
                    continue
                end = reason if done else None
                if chat:  # a row's last chunk may carry no text: its delta is then {}
                    message = p.DeltaMessage(content=delta) if delta else p.DeltaMessage()
                    choice = p.ChatCompletionResponseStreamChoice(index=i, delta=message, finish_reason=end)
                else:
                    choice = p.CompletionResponseStreamChoice(index=i, text=delta, finish_reason=end)
                yield chunk(**head, choices=[choice])
        self._count(req.model, jobs, time.perf_counter() - t0)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk(**head, choices=[], usage=self._usage(req, jobs))

    @staticmethod
    def _usage(req: p.SamplingFields, jobs: list[Job]) -> p.UsageInfo:
        prompt = sum(len(j.prompt_ids) for j in jobs[:: req.n])  # n samples of one prompt read it once
        completion = sum(j.completion_tokens for j in jobs)
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _count(self, model: str, jobs: list[Job], seconds: float) -> None:
        self.stats.count(
            model,
            prompt_tokens=sum(len(j.prompt_ids) for j in jobs),
            completion_tokens=sum(j.completion_tokens for j in jobs),
            seconds=seconds,
        )
