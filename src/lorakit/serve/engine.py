"""Batched generation for the server: no HTTP here.

Requests wait in a queue; a worker thread takes up to `max_batch` of them (waiting `window_s` for
company), and decodes them together with a KV cache. Rows of different adapters share each forward
pass through peft's per-row `adapter_names`, instead of switching the active adapter per request.
Each row has its own sampling settings, stop sequences and token budget, and streams its text
as it is produced.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Job:
    """One completion to produce. `emit(delta_text, finished, finish_reason)` is called from the worker."""

    prompt_ids: list[int]
    adapter: str | None  # internal adapter name, None for the base
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    emit: Callable[[str, bool, str | None], None] = lambda text, done, reason: None
    release: Callable[[], None] = lambda: None  # called once the job no longer uses its adapter
    # Filled by the engine:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(self, get_model: Callable[[], Any], tokenizer: Any, eos_ids: list[int], max_batch: int = 8,
                 window_s: float = 0.01, model_lock: threading.Lock | None = None):
        self.get_model, self.tokenizer, self.eos_ids = get_model, tokenizer, set(eos_ids)
        self.max_batch, self.window_s = max_batch, window_s
        self.lock = model_lock or threading.Lock()  # held during every forward; adapter loads take it too
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def depth(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                jobs.append(nxt)
            try:
                self.generate(jobs)
            except Exception as e:  # one bad batch must not stop the server
                for job in jobs:
                    if job.finish_reason is None:
                        job.finish_reason = "error"
                        job.emit(f"[engine error: {e}]", True, "error")
            finally:
                for job in jobs:
                    job.release()

    @torch.inference_mode()
    def generate(self, jobs: list[Job]) -> None:
        """Decode all jobs together until each hits EOS, a stop string or its token budget."""
        self.batches += 1
        net = self.get_model()
        width = max(len(j.prompt_ids) for j in jobs)
        # Left padding: every row's next token is then at the same position, the last column.
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[b, width - len(job.prompt_ids):] = 1
        device = next(net.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {}
        if hasattr(net, "peft_config"):
            kwargs["adapter_names"] = [j.adapter or BASE_ROW for j in jobs]
        gens = [torch.Generator().manual_seed(j.seed) if j.seed is not None else None for j in jobs]
        generated: list[list[int]] = [[] for _ in jobs]
        active = [True] * len(jobs)
        cache = DynamicCache()
        step_ids, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(max(j.max_tokens for j in jobs)):
            with self.lock:
                out = net(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, **kwargs)
            logits = out.logits[:, -1, :].float().cpu()
            next_ids = [self._pick(logits[b], job, gens[b]) for b, job in enumerate(jobs)]
            for b, job in enumerate(jobs):
                if active[b]:
                    active[b] = self._advance(job, generated[b], next_ids[b])
            if not any(active):
                break
            step_ids = torch.tensor(next_ids, device=device)[:, None]
            mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1

    def _pick(self, logits: torch.Tensor, job: Job, gen: torch.Generator | None) -> int:
        if job.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < job.top_p  # smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _advance(self, job: Job, tokens: list[int], token: int) -> bool:
        """Record one token; emit the new text; return whether the row goes on."""
        if token in self.eos_ids:
            job.finish_reason = "stop"
            job.emit("", True, "stop")
            return False
        tokens.append(token)
        job.completion_tokens += 1
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta, job.text, job.finish_reason = text[len(job.text):cut], text[:cut], "stop"
            job.emit(delta, True, "stop")
            return False
        # Hold back text that could be the start of a stop string, and half-decoded UTF-8.
        safe = len(text)
        for s in job.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        delta = text[len(job.text):safe] if safe > len(job.text) else ""
        job.text = text[:max(safe, len(job.text))]
        if job.completion_tokens >= job.max_tokens:
            rest = text[len(job.text):]
            job.text, job.finish_reason = text, "length"
            job.emit(delta + rest, True, "length")
            return False
        if delta:
            job.emit(delta, False, None)
        return True
