"""The OpenAI-compatible serving logic, testable without HTTP: requests in, response dicts or chunk streams out."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lorakit.serve import protocol as p
from lorakit.serve.adapters import Registry
from lorakit.serve.engine import Engine, Job


class APIError(Exception):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class Serving:
    def __init__(self, base_model: Any, tokenizer: Any, served_name: str, *, adapters_dir: Path | None = None,
                 max_adapters: int | None = None, max_batch: int = 8, window_s: float = 0.01,
                 max_tokens_limit: int = 1024, default_max_tokens: int = 256):
        self.tokenizer, self.served_name = tokenizer, served_name
        self.adapters_dir = adapters_dir
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.context = int(getattr(base_model.config, "max_position_embeddings", 2048))
        lock = threading.Lock()
        self.registry = Registry(base_model.eval(), lock, adapters_dir, max_adapters)
        gen = base_model.generation_config
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos_ids = [i for i in {tokenizer.eos_token_id, *eos} if i is not None]
        self.engine = Engine(lambda: self.registry.net, tokenizer, eos_ids, max_batch, window_s, lock)
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.started = p.now()

    # ---- models ----
    def models(self) -> dict:
        data = [{"id": self.served_name, "object": "model", "created": self.started, "owned_by": "lorakit",
                 "root": self.served_name, "parent": None}]
        for name, info in self.registry.describe().items():
            entry = {"id": name, "object": "model", "created": self.started, "owned_by": "lorakit",
                     "root": info.get("path"), "parent": self.served_name}
            if "error" in info:
                entry["error"] = info["error"]
            data.append(entry)
        return {"object": "list", "data": data}

    def load_adapter(self, req: p.LoadLoraRequest) -> str:
        if req.lora_name == self.served_name:
            raise APIError(400, f"'{req.lora_name}' is the base model's name")
        try:
            self.registry.load(req.lora_name, req.lora_path)
        except PermissionError as e:
            raise APIError(403, str(e), "permission_error") from None
        except FileNotFoundError as e:
            raise APIError(404, str(e), "not_found_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return f"adapter {req.lora_name} loaded"

    def unload_adapter(self, req: p.UnloadLoraRequest) -> str:
        try:
            self.registry.unload(req.lora_name)
        except KeyError:
            raise APIError(404, f"adapter '{req.lora_name}' is not loaded", "not_found_error") from None
        return f"adapter {req.lora_name} unloaded"

    # ---- completions ----
    def prepare(self, req: p.SamplingFields, prompts: list[list[int]]) -> list[Job]:
        """Validate limits and pin the adapter version for each of the request's rows."""
        max_tokens = self.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens <= 0 or max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens_limit}, got {max_tokens}",
                           param="max_tokens")
        for ids in prompts:
            if len(ids) + max_tokens > self.context:
                raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                               f"length {self.context}", param="messages")
        jobs = []
        for ids in prompts:
            for i in range(req.n):
                version = self._pin(req.model)
                jobs.append(Job(ids, version.internal if version else None, max_tokens, req.temperature, req.top_p,
                                req.stops(), None if req.seed is None else req.seed + i,
                                release=(lambda v=version: self.registry.release(v)) if version else (lambda: None)))
        return jobs

    def _pin(self, model: str) -> Any:
        if model == self.served_name:
            return None
        try:
            return self.registry.acquire(model)
        except KeyError:
            raise APIError(404, f"The model '{model}' does not exist: known models are "
                           f"{[self.served_name, *self.registry.active]}", "not_found_error", "model") from None

    def chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        text = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds any BOS

    def text_prompts(self, req: p.CompletionRequest) -> list[list[int]]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not s for s in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [self.tokenizer(s)["input_ids"] for s in prompts]

    async def run(self, jobs: list[Job]) -> AsyncIterator[tuple[int, str, bool, str | None]]:
        """Submit jobs and yield (row, delta_text, finished, finish_reason) as the engine produces them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.emit = lambda text, done, reason, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, text, done, reason))
            self.engine.submit(job)
        remaining = len(jobs)
        while remaining:
            item = await events.get()
            remaining -= item[2]
            yield item

    async def complete(self, req: p.SamplingFields, prompts: list[list[int]], chat: bool) -> dict:
        t0 = time.perf_counter()
        jobs = self.prepare(req, prompts)
        texts = [""] * len(jobs)
        reasons: list[str | None] = [None] * len(jobs)
        async for i, delta, done, reason in self.run(jobs):
            texts[i] += delta
            if done:
                reasons[i] = reason
        self._count(req.model, jobs, time.perf_counter() - t0)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs[:: req.n])
        completion_tokens = sum(j.completion_tokens for j in jobs)
        return {"id": p.new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
                "created": p.now(), "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def stream(self, req: p.SamplingFields, jobs: list[Job], chat: bool) -> AsyncIterator[dict]:
        """OpenAI stream chunks; the caller frames them as SSE and ends with [DONE]."""
        t0 = time.perf_counter()
        rid, created = p.new_id("chatcmpl" if chat else "cmpl"), p.now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            for i in range(len(jobs)):
                yield {"id": rid, "object": obj, "created": created, "model": req.model,
                       "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        async for i, delta, done, reason in self.run(jobs):
            if not delta and not done:
                continue
            choice = ({"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": reason if done else None}
                      if chat else {"index": i, "text": delta, "finish_reason": reason if done else None, "logprobs": None})
            yield {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
        self._count(req.model, jobs, time.perf_counter() - t0)

    # ---- metrics ----
    def _count(self, model: str, jobs: list[Job], seconds: float) -> None:
        s = self.stats[model]
        s["requests"] += 1
        s["completion_tokens"] += sum(j.completion_tokens for j in jobs)
        s["prompt_tokens"] += sum(len(j.prompt_ids) for j in jobs)
        s["latency_seconds_sum"] += seconds

    def metrics(self) -> str:
        """Prometheus text exposition: per-model counters and the queue depth."""
        lines = ["# TYPE lorakit_queue_depth gauge", f"lorakit_queue_depth {self.engine.depth()}",
                 "# TYPE lorakit_batches_total counter", f"lorakit_batches_total {self.engine.batches}"]
        names = {"requests": "lorakit_requests_total", "completion_tokens": "lorakit_completion_tokens_total",
                 "prompt_tokens": "lorakit_prompt_tokens_total", "latency_seconds_sum": "lorakit_request_latency_seconds_sum"}
        for key, metric in names.items():
            lines.append(f"# TYPE {metric} counter")
            for model, s in sorted(self.stats.items()):
                lines.append(f'{metric}{{model="{model}"}} {s[key]:g}')
        return "\n".join(lines) + "\n"
