"""Batched generation for the server: no HTTP here.

Requests wait in a queue. A worker thread decodes the running rows together, one token per forward
pass, with a KV cache. Between steps it admits waiting jobs (up to `max_batch` rows): they are
prefilled on their own, then joined to the running rows, so a request never waits for a whole batch
to finish (continuous batching). A row leaves the batch, and its cache rows are dropped, as soon as
it ends. Rows of different adapters share each forward pass: multi_lora computes every row's LoRA in two
batched matmuls per layer (peft's per-row `adapter_names` where multi_lora cannot), instead of switching
the active adapter per request. Each row has its own sampling settings, stop
strings and token budget, and streams its text as it is produced, decoded a few tokens at a time (`Text`).

`per_row_adapters=False` is the naive server kept for comparison (bench/serve_load.py): one job at a
time, with the active adapter switched by peft's `set_adapter` before its forward passes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.serve import multi_lora, threads

log = logging.getLogger("lorakit.serve")
BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the tokenizers library's ByteFallback decoder reads as a byte


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
    # Token ids that end this row (its adapter's end-of-turn and EOS); None: the engine's eos_ids; empty: none
    # (a request's ignore_eos).
    stop_ids: frozenset[int] | None = None
    emit: Callable[[str, bool, str | None], None] = lambda text, done, reason: None
    release: Callable[[], None] = lambda: None  # called once the job no longer uses its adapter
    cancelled: bool = False  # set by the caller (client gone): the row stops at the next step
    keep_logits: bool = False  # keep the logits that pick the first token (bench/serve_load.py compares them)
    # Filled by the engine:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    logits: torch.Tensor | None = None  # with keep_logits: (vocab,) fp32 on the CPU


@dataclass
class Text:
    """A row's text, decoded a few tokens at a time as vLLM's `detokenize_incrementally` does: decoding the
    whole answer at every step costs time quadratic in its length.

    A step decodes ids[prefix:] and keeps what it adds to decode(ids[prefix:read]). That chunk before the new
    tokens is decoded again because a decode of the last tokens alone can differ from the tail of the whole
    decode: SentencePiece (Llama) drops the leading space of the first token decoded. The text that later ids
    can still change waits in `half`, and the window moves on only past it: a character split over byte tokens
    decodes to U+FFFD until its last byte comes, and a run of byte-fallback tokens decodes all or nothing
    (`_open_ids`). Holds: text + half == decode(ids), special tokens skipped.
    """

    ids: list[int] = field(default_factory=list)  # the row's generated ids
    text: str = ""  # decode(ids) as far as later ids cannot change it: it only ever grows
    half: str = ""  # the rest: an unfinished character's U+FFFD, an open run of byte-fallback tokens
    prefix: int = 0  # ids[prefix:read]: the chunk decoded before the newest ids, decoded again as their context
    read: int = 0  # ids[read:]: the ids after the last settled character
    prefix_len: int = 0  # len(decode(ids[prefix:read]))
    read_len: int = 0  # len(decode(ids[:read])): text[:read_len] never changes

    def add(self, token: int, decode: Callable[[list[int]], str], open_ids: frozenset[int] = frozenset()) -> None:
        self.ids.append(token)
        window = decode(self.ids[self.prefix :])
        end = len(self.ids)  # the text up to the last id not in open_ids is settled
        while end > self.read and self.ids[end - 1] in open_ids:
            end -= 1
        settled = window if end == len(self.ids) else decode(self.ids[self.prefix : end])
        full = self.text[: self.read_len] + window[self.prefix_len :]
        self.text = (self.text[: self.read_len] + settled[self.prefix_len :]).rstrip("\ufffd")
        self.half = full[len(self.text) :]
        if end == len(self.ids) and len(window) > self.prefix_len and not self.half:  # all settled: move on
            self.prefix, self.read, self.read_len = self.read, len(self.ids), len(full)
            self.prefix_len = len(decode(self.ids[self.prefix : self.read]))


@dataclass
class Rows:
    """Rows decoding together. Invariant: mask is (B, T) with T = the cache's length, and `last`
    holds each row's newest token, picked but not yet fed to the model."""

    jobs: list[Job]
    cache: DynamicCache
    mask: torch.Tensor  # (B, T) 1 = real token, 0 = left padding
    pos: torch.Tensor  # (B,) position id of each row's next token
    last: list[int]
    texts: list[Text]  # generated ids and text per row
    gens: list[torch.Generator | None]


class Engine:
    def __init__(
        self,
        get_model: Callable[[], Any],
        tokenizer: Any,
        eos_ids: list[int],
        max_batch: int = 8,
        window_s: float = 0.01,
        model_lock: threading.Lock | None = None,
        per_row_adapters: bool = True,
        batched_lora: bool = True,
    ):
        self.get_model, self.tokenizer, self.eos_ids = get_model, tokenizer, set(eos_ids)
        # Text decodes windows of a few tokens: tokenization-space cleanup (" ." -> ".") would rewrite text across
        # their edges, so it stays off here, as transformers 5 has it by default (vLLM's streams skip it too).
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        self.open_ids = _open_ids(tokenizer)
        self.max_batch, self.window_s, self.per_row_adapters = max_batch, window_s, per_row_adapters
        self.batched_lora = batched_lora  # multi_lora's batched path; False: peft's per-row adapter_names
        self.lock = model_lock or threading.Lock()  # held during every forward; adapter loads take it too
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.pad_id = tokenizer.pad_token_id  # set by model.load_tokenizer
        # Adapters come and go (peft wraps and unwraps the model), but the weights never move device.
        self.device = next(get_model().parameters()).device
        # transformers renamed `past_key_values` to `cache` (the old name goes in 5.40): use what this model takes.
        self.cache_kw = "cache" if "cache" in inspect.signature(get_model().forward).parameters else "past_key_values"
        self.batches = 0  # times decoding started from idle
        self.joined = 0  # jobs admitted into rows already decoding
        self.running = 0  # rows decoding now
        self.step_times: list[tuple[int, float]] | None = None  # a list: (rows, seconds) of each step
        # Every forward runs in the worker thread below, which sets torch's threads (--threads, or auto: the
        # cores that other processes leave free) before its steps: see threads.py.
        self.threads = threads.follower()
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
        rows: Rows | None = None
        while True:
            new = self._take(rows)
            if new is None:
                return
            self.threads()
            fresh = None
            try:
                fresh = self._prefill(new) if new else None
            except Exception as e:  # noqa: BLE001 - failing requests must not stop the rows already running
                self._fail(new, e)
            try:
                rows = self._join(rows, fresh)
                if rows is not None:
                    n, t0 = len(rows.jobs), time.perf_counter() if self.step_times is not None else 0.0
                    rows = self._step(rows)
                    if self.step_times is not None:
                        self.step_times.append((n, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                self._fail((rows.jobs if rows else []) + (fresh.jobs if fresh else []), e)
                rows = None
            self.running = len(rows.jobs) if rows else 0

    def _take(self, rows: Rows | None) -> list[Job] | None:
        """Jobs to admit now: when idle, block for one and wait `window_s` for company; else never wait."""
        room = self.max_batch - (len(rows.jobs) if rows else 0)
        jobs: list[Job] = []
        if rows is None:
            first = self.queue.get()
            if first is None:
                return None
            jobs, deadline = [first], time.monotonic() + self.window_s
        elif not self.per_row_adapters or not _joinable(rows.cache):
            return []
        while len(jobs) < room:
            try:
                nxt = (
                    self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    if rows is None
                    else self.queue.get_nowait()
                )
            except queue.Empty:
                break
            if nxt is None:
                self.queue.put(None)  # stop once the running rows are done
                break
            jobs.append(nxt)
        for job in [j for j in jobs if j.cancelled]:  # the client left while its job waited
            jobs.remove(job)
            job.release()
        self.batches += rows is None and bool(jobs)
        self.joined += 0 if rows is None else len(jobs)
        return jobs

    @torch.inference_mode()
    def _prefill(self, jobs: list[Job]) -> Rows | None:
        """Run the prompts (left padded) and pick each row's first token."""
        width = max(len(j.prompt_ids) for j in jobs)
        # Left padding: every row's next token is then at the same position, the last column.
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[b, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        logits = self._forward(jobs, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        for b, job in enumerate(jobs):
            if job.keep_logits:
                job.logits = logits[b].to("cpu", torch.float32, copy=True)
        gens = [torch.Generator().manual_seed(j.seed) if j.seed is not None else None for j in jobs]
        rows = Rows(jobs, cache, mask, mask.sum(-1), [0] * len(jobs), [Text() for _ in jobs], gens)
        return self._settle(rows, logits)

    @torch.inference_mode()
    def _step(self, rows: Rows) -> Rows | None:
        """Feed each row's newest token and pick the next one."""
        ids = torch.tensor(rows.last, device=rows.mask.device)[:, None]
        rows.mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        logits = self._forward(rows.jobs, ids, rows.mask, rows.pos[:, None], rows.cache)
        rows.pos = rows.pos + 1
        return self._settle(rows, logits)

    def _forward(
        self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Next-token logits (B, vocab), on the model's device and in its dtype (a greedy pick needs no copy)."""
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self.cache_kw: cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }  # logits of the last position only: vocab x prompt is big
        with self.lock:
            # The model is fetched under the lock: the registry wraps it in peft at the first adapter load
            # and unwraps it when the last one goes, and the base weights (so this cache) stay valid.
            net = self.get_model()
            if not hasattr(net, "peft_config"):
                out = net(**kwargs)
            elif self.per_row_adapters and self.batched_lora and multi_lora.supported(net):
                # Each row's own adapter, gathered, in one batched LoRA computation per layer for all rows.
                with multi_lora.rows(net, [j.adapter for j in jobs]):
                    out = net(**kwargs)
            elif self.per_row_adapters:
                out = net(**kwargs, adapter_names=[j.adapter or BASE_ROW for j in jobs])
            elif jobs[0].adapter is None:
                with net.disable_adapter():
                    out = net(**kwargs)
            else:
                if net.active_adapter != jobs[0].adapter:
                    net.set_adapter(jobs[0].adapter, inference_mode=True)
                out = net(**kwargs)
        return out.logits[:, -1, :]

    def _settle(self, rows: Rows, logits: torch.Tensor) -> Rows | None:
        """Pick and record each row's next token; drop finished rows (and their cache rows)."""
        # Greedy rows' picks in one argmax and one copy to the CPU, not a (B, vocab) copy and B argmaxes.
        greedy = logits.argmax(-1).tolist() if any(j.temperature <= 0 for j in rows.jobs) else []
        keep = []
        for b, job in enumerate(rows.jobs):
            if job.cancelled:  # the client is gone: nobody to tell
                job.finish_reason = "cancelled"
                job.release()
                continue
            try:
                token = greedy[b] if job.temperature <= 0 else _sample(logits[b].float().cpu(), job, rows.gens[b])
                goes_on = self._advance(job, rows.texts[b], token)
            except Exception as e:  # noqa: BLE001 - one row's failure (its sampling, its text) ends that row only
                self._fail([job], e)
                continue
            if goes_on:
                rows.last[b] = token
                keep.append(b)
        if len(keep) == len(rows.jobs):
            return rows
        if not keep:
            return None
        idx = torch.tensor(keep, device=rows.mask.device)
        rows.cache.batch_select_indices(idx)
        rows.mask, rows.pos = rows.mask[idx], rows.pos[idx]
        rows.jobs, rows.last, rows.texts, rows.gens = (
            [xs[b] for b in keep] for xs in (rows.jobs, rows.last, rows.texts, rows.gens)
        )
        return rows

    @staticmethod
    def _join(a: Rows | None, b: Rows | None) -> Rows | None:
        """One batch of both: the shorter cache is left-padded (masked) to the longer one's length."""
        if a is None or b is None:
            return a or b
        width = max(a.mask.shape[1], b.mask.shape[1])
        for r in (a, b):
            pad = width - r.mask.shape[1]
            r.mask = F.pad(r.mask, (pad, 0))
            for layer in r.cache.layers:  # keys/values: (B, heads, T, head_dim)
                layer.keys, layer.values = F.pad(layer.keys, (0, 0, pad, 0)), F.pad(layer.values, (0, 0, pad, 0))
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])
        a.mask, a.pos = torch.cat([a.mask, b.mask]), torch.cat([a.pos, b.pos])
        a.jobs, a.last, a.texts, a.gens = a.jobs + b.jobs, a.last + b.last, a.texts + b.texts, a.gens + b.gens
        return a

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        log.error("generation failed for %d row(s)", len(jobs), exc_info=e)  # the cause, for the operator
        for job in jobs:
            if job.finish_reason is None:
                job.error = f"{type(e).__name__}: {e}"
                _finish(job, "", "error")

    def _advance(self, job: Job, text: Text, token: int) -> bool:
        """Record one token; emit the new text; return whether the row goes on."""
        # usage.completion_tokens counts every generated token, the end-of-turn or EOS that ends the answer too:
        # OpenAI's rule, and vLLM's (its usage is len(output.token_ids), which holds the stop token).
        job.completion_tokens += 1
        if token in (self.eos_ids if job.stop_ids is None else job.stop_ids):
            return _end(job, text, "stop")
        seen = len(text.text)  # stop strings were looked for in this much
        text.add(token, self.decode, self.open_ids)
        cut = _stop_at(text.text, job.stop, seen)
        if cut >= 0:
            delta, job.text = text.text[len(job.text) : cut], text.text[:cut]
            _finish(job, delta, "stop")
            return False
        if job.completion_tokens >= job.max_tokens:
            return _end(job, text, "length")
        safe = len(text.text) - _held(text.text, job.stop)  # a half character is not in text.text either
        if safe > len(job.text):
            delta = text.text[len(job.text) : safe]
            job.text += delta
            job.emit(delta, False, None)
        return True


def _sample(logits: torch.Tensor, job: Job, gen: torch.Generator | None) -> int:
    """A token drawn from fp32 CPU logits (vocab,) at the job's temperature and top_p."""
    # Shifted so the largest is 0: a tiny temperature then gives -inf (probability 0), never inf - inf = nan.
    probs = torch.softmax((logits - logits.max()) / job.temperature, dim=-1)
    if job.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < job.top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _open_ids(tokenizer: Any) -> frozenset[int]:
    """Ids after which the decoded text can still change, beyond an unfinished character: byte-fallback tokens
    `<0xNN>` (SentencePiece decodes a run of them all or nothing: "日" is three of them, and a fourth that
    completes no character turns all four into U+FFFD), and, where there are such, the special ids the decode
    skips (a run goes on across them). Byte-level BPE (GPT-2, SmolLM) has none: its text only grows."""
    byte_ids = {i for t, i in tokenizer.get_vocab().items() if BYTE_TOKEN.fullmatch(t)}
    if not byte_ids:
        return frozenset()
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(byte_ids | set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special})


def _stop_at(text: str, stops: list[str], seen: int) -> int:
    """Where the first stop string in `text` starts, or -1. Those ending within text[:seen] were looked for
    at earlier steps: only the end of the text is searched."""
    return min((i for i in (text.find(s, max(0, seen - len(s))) for s in stops) if i >= 0), default=-1)


def _held(text: str, stops: list[str]) -> int:
    """How many of the last characters of `text` could be the start of a stop string (held back until known)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


def _end(job: Job, text: Text, reason: str) -> bool:
    """End a row at its last token: the text held back (a possible stop-string start, a half-decoded character,
    an open run of bytes) is final now, and goes with the last event, cut at a stop string that it completes."""
    full = text.text + text.half
    cut = _stop_at(full, job.stop, len(text.text))
    full, reason = (full[:cut], "stop") if cut >= 0 else (full, reason)
    delta, job.text = full[len(job.text) :], full
    _finish(job, delta, reason)
    return False


def _finish(job: Job, delta: str, reason: str) -> None:
    """End a row. Its adapter version is released before the last event goes out, so a client that
    has its whole answer never finds that version still pinned (a retired one is already freed)."""
    job.finish_reason = reason
    job.release()
    job.emit(delta, True, reason)


def _joinable(cache: DynamicCache) -> bool:
    # Plain layers only: a sliding-window layer keeps the last W positions, which left padding would shift.
    return all(type(layer) is DynamicLayer for layer in cache.layers)
