"""Load test of `lorakit serve`: N requests from C concurrent clients over K adapters, as JSON.

    python bench/serve_load.py --model smollm2-135m-instruct --adapter sql=runs/quickstart \\
        --adapter sql2=runs/qs2 --requests 16 --concurrency 4 --max-tokens 32 --batching on
    python bench/serve_load.py --distinct-adapters 8 --requests 32 --concurrency 8 --repeats 3  # the table

--distinct-adapters K makes K LoRA adapters of random weights (ranks 8 and 16 alternating, all linear
layers) on the base, and runs four servers on the same requests, each request to the next adapter in turn:
the base model alone (no adapter, the ceiling), batching with lorakit's batched multi-adapter LoRA
(serve/multi_lora.py), batching with peft's per-row `adapter_names` (what it replaced), and one request
at a time with the active adapter switched per request. Greedy answers must be identical in the three
adapter modes, or the numbers do not count.

The app runs in this process behind httpx's ASGI transport (no network in the way), so the numbers are
the serving stack and the model: requests/s, completion tokens/s, p50/p99 latency, errors. Compare
`--batching on` (mixed-adapter continuous batching) with `--batching off` (one request at a time, the
active adapter switched per request), and checks that both modes give the same greedy answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx

from lorakit.errors import LorakitError
from lorakit.serve import server

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
    sem = asyncio.Semaphore(concurrency)
    transport = httpx.ASGITransport(app=app)

    async def limited(i: int, client: httpx.AsyncClient):
        async with sem:
            return await one(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens)

    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
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
    with tempfile.TemporaryDirectory() as tmp:
        adapters = random_adapters(args.model, args.distinct_adapters, tmp)
        for rep in range(args.repeats):
            for mode, batching, batched_lora in modes if rep % 2 == 0 else modes[::-1]:
                used = {} if mode == "base_only" else adapters
                opts = server.ServeOptions(model=args.model, served_model_name="base", adapters=used,
                                           batching=batching, max_batch=args.max_batch)  # fmt: skip
                app, serving = server.build(opts)
                serving.engine.batched_lora = batched_lora
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
        "same_answers_adapter_modes": all(
            a == first for m in ("batched_lora", "peft_per_row", "one_at_a_time") for a in answers[m]
        ),
        "answers_differing_from_base": f"{differ}/{len(first)}",
        "batched_vs_one_at_a_time": round(rate / out["one_at_a_time"]["requests_per_s"], 2),
        "batched_vs_peft_per_row": round(rate / out["peft_per_row"]["requests_per_s"], 2),
        "batched_vs_base_only": round(rate / out["base_only"]["requests_per_s"], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="adapter (repeatable)")
    p.add_argument("--requests", type=int, default=16, help="total requests")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--batching", choices=["on", "off", "both"], default="both", help="server batching mode(s)")
    p.add_argument("--max-batch", type=int, default=8, help="batch size cap when batching")
    p.add_argument("--distinct-adapters", type=int, default=0, metavar="K",
                   help="K random adapters: base only vs batched LoRA vs peft per-row vs one at a time")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="with --distinct-adapters: the four servers N times in alternating order; medians")  # fmt: skip
    args = p.parse_args()
    if args.distinct_adapters:
        try:
            print(json.dumps(distinct(args), indent=1))
        except LorakitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    adapters = dict(a.split("=", 1) for a in args.adapter)
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
