"""Load test of `lorakit serve`: N requests from C concurrent clients over K adapters, as JSON.

    python bench/serve_load.py --model smollm2-135m-instruct --adapter sql=runs/quickstart \\
        --adapter sql2=runs/qs2 --requests 16 --concurrency 4 --max-tokens 32 --batching on
    python bench/serve_load.py --distinct-adapters 8 --requests 32 --concurrency 8 --repeats 3  # the table
    python bench/serve_load.py --overhead  # the engine's decode step against the bare forward, batch 1-16
    python bench/serve_load.py --neighbour 1 --repeats 3  # alone vs beside a CPU-bound process

--distinct-adapters K makes K LoRA adapters of random weights (ranks 8 and 16 alternating, all linear
layers) on the base, and runs four servers on the same requests, each request to the next adapter in turn:
the base model alone (no adapter, the ceiling), batching with lorakit's batched multi-adapter LoRA
(serve/multi_lora.py), batching with peft's per-row `adapter_names` (what it replaced), and one request
at a time with the active adapter switched per request. The three adapter modes must answer alike, or the
numbers do not count (exit 1): the logits that pick each answer's first token within the dtype's tolerance
(lorakit.parity) of one request at a time's, and in fp32 identical greedy answers. In bf16/fp16 batching
rounds differently (other padding, other matmul shapes), so an answer can turn at a near tie: the share of
identical answers is reported beside the logits instead.

The app runs in this process behind httpx's ASGI transport (no network in the way), so the numbers are
the serving stack and the model: requests/s, completion tokens/s, p50/p99 latency, errors. Compare
`--batching on` (mixed-adapter continuous batching) with `--batching off` (one request at a time, the
active adapter switched per request), and checks that both modes give the same greedy answers.

--neighbour N serves the same load alone and beside N CPU-bound processes (`--neighbour-kind`: a torch
matmul loop on torch's default threads, as a training process runs, or a pure Python loop, one core each),
`--repeats` times in alternating order, with the server's threads as `lorakit serve --threads` chooses them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import get_args

import httpx

from lorakit.config import Dtype
from lorakit.errors import LorakitError
from lorakit.serve import server, threads

QUESTIONS = [
    "Who works in Lisbon?",
    "How many employees work in Sales?",
    "What is Nora's salary?",
    "Which employees in Oslo earn more than 52000?",
    "Who earns more than 87000?",
    "What is the average salary in Finance?",
    "Which department is Emma in?",
    "Who works in Legal?",
]


async def one(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> tuple[float, int, str | None]:
    """(latency, completion tokens, answer or None on error) of one greedy chat request."""
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    if r.status_code != 200:
        return time.perf_counter() - t0, 0, None
    body = r.json()
    return time.perf_counter() - t0, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


async def load(app, models: list[str], n: int, concurrency: int, max_tokens: int) -> dict:
    """n greedy chat requests from `concurrency` clients against `app` (an ASGI app, in process) or a server's URL
    (a str, over HTTP: bench/serve_scale.py); the numbers and the answers."""
    sem = asyncio.Semaphore(concurrency)
    if isinstance(app, str):
        where = {"base_url": app, "limits": httpx.Limits(max_connections=concurrency + 1)}
    else:
        where = {"base_url": "http://bench", "transport": httpx.ASGITransport(app=app)}

    async def limited(i: int, client: httpx.AsyncClient):
        async with sem:
            return await one(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens)

    async with httpx.AsyncClient(timeout=600, **where) as client:
        await one(client, models[0], QUESTIONS[0], 4)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "requests": n,
        "concurrency": concurrency,
        "models": models,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "errors": sum(r[2] is None for r in results),
        "completion_tokens": tokens,
        "answers": [r[2] for r in results],
    }


def random_adapters(base: str, k: int, folder: str) -> dict[str, str]:
    """K adapters of random weights (ranks 8/16 alternating) saved in peft's format under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit import model

    out = {}
    for i in range(k):
        net = model.load_model(base)
        torch.manual_seed(i)
        cfg = LoraConfig(r=8 if i % 2 == 0 else 16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        lora = get_peft_model(net, cfg)
        with torch.no_grad():  # small enough that answers stay text, large enough that each adapter differs
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
        path = f"{folder}/a{i}"
        lora.save_pretrained(path)
        model.load_tokenizer(base).save_pretrained(path)
        out[f"a{i}"] = path
    return out


def distinct(args: argparse.Namespace) -> dict:
    """The four servers of --distinct-adapters on the same requests, `--repeats` times in alternating order
    (forward, then backward: a machine that slows down or speeds up during the run favours no server);
    each server's run of median requests/s, and the ratios of those medians to the batched LoRA."""
    import tempfile

    modes = (
        ("base_only", "on", True),
        ("batched_lora", "on", True),
        ("peft_per_row", "on", False),
        ("one_at_a_time", "off", False),
    )
    runs: dict[str, list[dict]] = {mode: [] for mode, _, _ in modes}
    kept: dict[str, list] = {mode: [] for mode, _, _ in modes}  # each mode's jobs, with their first logits
    with tempfile.TemporaryDirectory() as tmp:
        adapters = random_adapters(args.model, args.distinct_adapters, tmp)
        for rep in range(args.repeats):
            for mode, batching, batched_lora in modes if rep % 2 == 0 else modes[::-1]:
                used = {} if mode == "base_only" else adapters
                opts = server.ServeOptions(model=args.model, served_model_name="base", adapters=used,
                                           batching=batching, max_batch=args.max_batch, dtype=args.dtype)  # fmt: skip
                app, serving = server.build(opts)
                serving.engine.batched_lora = batched_lora
                keep_first_logits(serving.engine, kept[mode])
                runs[mode].append(asyncio.run(load(app, list(used) or ["base"], args.requests, args.concurrency,
                                                   args.max_tokens)))  # fmt: skip
                serving.close()
    answers = {m: [r.pop("answers") for r in rs] for m, rs in runs.items()}
    out = {}
    for mode, rs in runs.items():
        rates = [r["requests_per_s"] for r in rs]
        out[mode] = sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2] | {"requests_per_s_each": rates}
    first = answers["batched_lora"][0]
    differ = sum(a != b for a, b in zip(first, answers["base_only"][0]))
    rate = out["batched_lora"]["requests_per_s"]
    return {
        **out,
        "repeats": args.repeats,
        **adapter_modes_agree(answers, kept, args.dtype),
        "answers_differing_from_base": f"{differ}/{len(first)}",
        "batched_vs_one_at_a_time": round(rate / out["one_at_a_time"]["requests_per_s"], 2),
        "batched_vs_peft_per_row": round(rate / out["peft_per_row"]["requests_per_s"], 2),
        "batched_vs_base_only": round(rate / out["base_only"]["requests_per_s"], 2),
    }


NEIGHBOURS = {
    # A training process's shape of work: every core (torch's default threads), matmuls back to back.
    "torch": "import torch\na = torch.randn(512, 512)\nb = a @ a\nprint('ready', flush=True)\nwhile True:\n"
    "    b = a @ a",
    "python": "print('ready', flush=True)\nwhile True:\n    pass",  # one core, nothing shared
}


@contextlib.contextmanager
def neighbours(n: int, kind: str):
    """N CPU-bound processes running for the block; each has started its loop when the block starts.

    Each in a session of its own, as a job started from another shell or by a scheduler: Linux's autogroup
    (on by default on desktops and here) shares the CPU between sessions first, then between their threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # not the server's threads
    procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOURS[kind]], stdout=subprocess.PIPE, env=env,
                              start_new_session=True) for _ in range(n)]  # fmt: skip
    try:
        for p in procs:
            p.stdout.readline()
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def contention(args: argparse.Namespace, adapters: dict[str, str]) -> dict:
    """--neighbour N: the same load on one server alone and beside N CPU-bound processes, `--repeats` times in
    alternating order (a machine that slows down or speeds up during the run favours neither); the medians, each
    run's requests/s, and the ratio of the medians (the target: no less than the cores the neighbours leave)."""
    opts = server.ServeOptions(model=args.model, served_model_name="base", adapters=adapters, threads=args.threads,
                               max_batch=args.max_batch, dtype=args.dtype)  # fmt: skip
    app, serving = server.build(opts)
    models = list(adapters) or ["base"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`'s signal: stop the neighbours too
    runs: dict[str, list[dict]] = {"alone": [], "neighbours": []}
    for rep in range(args.repeats):
        for which in ("alone", "neighbours") if rep % 2 == 0 else ("neighbours", "alone"):
            with neighbours(args.neighbour if which == "neighbours" else 0, args.neighbour_kind):
                run = asyncio.run(load(app, models, args.requests, args.concurrency, args.max_tokens))
            run.pop("answers")
            follower = serving.engine.threads  # what auto last measured and chose
            runs[which].append(run | {"engine_threads": follower.threads, "others_busy_cores": follower.others})
            print(f"{which}: {run['requests_per_s']} requests/s", file=sys.stderr, flush=True)  # a slow run's progress
    serving.close()
    out = {}
    for which, rs in runs.items():
        rates = [r["requests_per_s"] for r in rs]
        out[which] = sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2] | {"requests_per_s_each": rates}
    return {
        **out,
        "neighbour": args.neighbour,
        "neighbour_kind": args.neighbour_kind,
        "cores": threads.usable_cores(),
        "threads": args.threads or "auto",
        "repeats": args.repeats,
        "neighbours_vs_alone": round(out["neighbours"]["requests_per_s"] / out["alone"]["requests_per_s"], 3),
    }


def device_and_dtype(dtype: str) -> tuple[str, str]:
    """Where `lorakit serve` runs by default (the GPU when there is one) and the dtype --dtype means there."""
    from lorakit import model

    device = model.pick_device("auto")
    return device, {v: k for k, v in model.DTYPES.items()}[model.pick_dtype(dtype, device)]


def keep_first_logits(engine, kept: list) -> None:
    """Every job submitted to `engine` from now on keeps the logits of its first pick, and is added to `kept`."""
    submit = engine.submit

    def keeping(job) -> None:
        job.keep_logits = True
        kept.append(job)
        submit(job)

    engine.submit = keeping


def adapter_modes_agree(answers: dict[str, list[list]], kept: dict[str, list], dtype: str) -> dict:
    """Do the three adapter modes answer alike? Each batched mode against one request at a time (rows alone):
    the logits that pick each answer's first token within the dtype's tolerance (lorakit.parity), and the
    share of identical greedy answers. In fp32 the answers must be identical; in 16-bit, batching (another
    padding, another matmul shape) changes the rounding, so an answer can turn at a near tie: there the
    logits decide, and the agreement is reported beside them."""
    import torch

    from lorakit import parity

    def key(job) -> tuple:  # the adapter without its load's version (name@N), and the prompt
        return (job.adapter and job.adapter.rsplit("@", 1)[0], tuple(job.prompt_ids))

    reference, alone = answers["one_at_a_time"][0], {}
    for job in kept["one_at_a_time"]:
        alone.setdefault(key(job), job.logits)
    _, name = device_and_dtype(dtype)
    logits, agreement = {}, {}
    for mode in ("batched_lora", "peft_per_row"):
        jobs = [j for j in kept[mode] if j.logits is not None]
        got = torch.stack([j.logits for j in jobs])
        want = torch.stack([alone[key(j)] for j in jobs])
        logits[mode] = parity.compare(got, want, parity.TOLERANCE[name])
        same = [a == b for run in answers[mode] for a, b in zip(run, reference)]
        agreement[mode] = round(sum(same) / len(same), 4)
    identical = all(a == reference for m in ("batched_lora", "peft_per_row", "one_at_a_time") for a in answers[m])
    ok = all(r["ok"] for r in logits.values()) and (identical or name != "fp32")
    return {
        "dtype": name,
        "ok": ok,
        "same_answers_adapter_modes": identical,
        "greedy_agreement_vs_one_at_a_time": agreement,
        "first_step_logits_vs_one_at_a_time": logits,
    }


def overhead(args: argparse.Namespace) -> dict:
    """--overhead: the engine's decode step against the bare forward it wraps, on the base model alone.

    The engine step is `Engine._step` (feed each row's newest token, pick the next, stream its text), timed by
    the engine itself (`step_times`); the bare forward is the same model called directly on the same batch and
    cache length, with a DynamicCache, `logits_to_keep=1`, under inference_mode (no mask, no picking, no text).
    Every row has the same prompt and no stop ids, so all rows run exactly --max-tokens tokens together.

    Every torch call runs in a fresh thread of its own, as the engine's run in its worker thread: on Linux
    torch's OpenMP (libgomp) keeps a team of threads for each thread that ran a parallel op, and once it
    manages more threads than there are cores it stops spinning between parallel regions and sleeps instead.
    A forward in one thread while another thread's team exists (the main thread's, once it ran a parallel op)
    measured 1.3-1.5x slower on 2 cores: that is the process's threads, not the engine.
    """
    import torch

    from lorakit import model

    device, dtype = device_and_dtype(args.dtype)
    tok = model.load_tokenizer(args.model)
    net = in_thread(model.load_model, args.model, dtype=model.DTYPES[dtype], device=device).eval()
    text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    new = args.max_tokens or 128
    in_thread(bare_forward, net, prompt, 1, 8)  # warm-up: first calls allocate
    sizes = []
    for batch in args.batch_sizes:
        eng, bare = [], []
        for rep in range(args.repeats):  # alternating order: a machine that drifts favours neither
            for which in ("engine", "bare") if rep % 2 == 0 else ("bare", "engine"):
                if which == "engine":
                    eng += engine_steps(net, tok, prompt, batch, new)
                else:
                    bare += in_thread(bare_forward, net, prompt, batch, new)
        e, b = statistics.median(eng), statistics.median(bare)
        sizes.append({"batch": batch, "engine_step_ms": round(e * 1e3, 3), "bare_forward_ms": round(b * 1e3, 3),
                      "ratio": round(e / b, 3), "steps": len(eng)})  # fmt: skip
    return {"model": args.model, "device": device, "dtype": dtype,
            "prompt_tokens": len(prompt), "new_tokens": new, "threads": torch.get_num_threads(),
            "batches": sizes}  # fmt: skip


def in_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh thread, gone when it returns (see `overhead`)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def engine_steps(net, tok, prompt: list[int], batch: int, new: int) -> list[float]:
    """Seconds of each engine decode step with `batch` rows (the steps after their shared prefill)."""
    import queue

    from lorakit.serve.engine import Engine, Job

    # A long window: the engine starts once all rows are queued, so they prefill and decode as one batch.
    engine = Engine(lambda: net, tok, [tok.eos_token_id], max_batch=batch, window_s=600.0)
    engine.step_times, ended = [], queue.Queue()
    for _ in range(batch):
        engine.submit(Job(prompt, None, new, stop_ids=frozenset(), emit=lambda t, done, why: done and ended.put(why)))
    reasons = [ended.get(timeout=600) for _ in range(batch)]
    engine.close()
    assert reasons == ["length"] * batch, reasons
    return [s for n, s in engine.step_times if n == batch]


def bare_forward(net, prompt: list[int], batch: int, new: int) -> list[float]:
    """Seconds of each bare decode forward of `batch` rows, the cache growing from the prompt as the engine's."""
    import inspect

    import torch
    from transformers import DynamicCache

    device = next(net.parameters()).device
    # transformers renamed `past_key_values` to `cache`: use what this model takes, as the engine does.
    cache_kw = "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([prompt] * batch, device=device)
        out = net(input_ids=ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
        for _ in range(new - 1):  # the engine's prefill picks the first token; each step then one more
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t0 = time.perf_counter()
            out = net(input_ids=ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="adapter (repeatable)")
    p.add_argument("--requests", type=int, default=16, help="total requests")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="max_tokens per request (default 32; 128 with --overhead)"
    )
    p.add_argument("--batching", choices=["on", "off", "both"], default="both", help="server batching mode(s)")
    p.add_argument("--max-batch", type=int, default=8, help="batch size cap when batching")
    p.add_argument("--distinct-adapters", type=int, default=0, metavar="K",
                   help="K random adapters: base only vs batched LoRA vs peft per-row vs one at a time")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="the four servers of --distinct-adapters, or --overhead's engine and bare forward, N times "
                        "in alternating order; medians")  # fmt: skip
    p.add_argument("--neighbour", type=int, default=0, metavar="N",
                   help="serve alone and beside N CPU-bound processes, --repeats times alternating")  # fmt: skip
    p.add_argument("--neighbour-kind", choices=sorted(NEIGHBOURS), default="torch",
                   help="with --neighbour: a torch matmul loop on all cores (as training), or Python")  # fmt: skip
    threads_opt = next(f for f in dataclasses.fields(server.ServeOptions) if f.name == "threads")
    p.add_argument("--threads", type=int, default=None, help=threads_opt.metadata["help"])
    dtype = next(f for f in dataclasses.fields(server.ServeOptions) if f.name == "dtype")  # serve's own option
    p.add_argument("--dtype", choices=get_args(Dtype), default=dtype.default, help=dtype.metadata["help"])
    p.add_argument("--overhead", action="store_true",
                   help="time the engine's decode step against the bare forward (base model, no adapters)")  # fmt: skip
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8, 16],
                   metavar="N,N,...", help="with --overhead: the batch sizes")  # fmt: skip
    args = p.parse_args()
    threads.apply(args.threads)  # before torch loads, as `lorakit serve` does
    if args.overhead:
        print(json.dumps(overhead(args)))
        return 0
    args.max_tokens = args.max_tokens or 32
    if args.distinct_adapters:
        try:
            out = distinct(args)
        except LorakitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(out, indent=1))
        if not out["ok"]:
            print(
                "error: the adapter modes do not answer alike (see ok above): the numbers do not count", file=sys.stderr
            )
            return 1
        return 0
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if args.neighbour:
        print(json.dumps(contention(args, adapters), indent=1))
        return 0
    out = {}
    try:
        for mode in ["on", "off"] if args.batching == "both" else [args.batching]:
            opts = server.ServeOptions(
                model=args.model, served_model_name="base", adapters=adapters, batching=mode, max_batch=args.max_batch
            )
            app, serving = server.build(opts)
            models = list(adapters) or ["base"]
            out[f"batching_{mode}"] = asyncio.run(load(app, models, args.requests, args.concurrency, args.max_tokens))
            out[f"batching_{mode}"]["engine_batches"] = serving.engine.batches
            out[f"batching_{mode}"]["joined_running_batch"] = serving.engine.joined
            serving.close()
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    answers = [r.pop("answers") for r in out.values()]
    if len(answers) == 2:  # greedy decoding: batching must not change a single answer
        out["same_answers_both_modes"] = answers[0] == answers[1]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
