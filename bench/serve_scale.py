"""One replica against replicas that scale with the queue: `lorakit serve --replicas` on Ray Serve, as JSON.

    python bench/serve_scale.py --model smollm2-135m-instruct --requests 96 --concurrency 8 --max-replicas 2
    python bench/serve_scale.py --model tiny   # the tests' tiny model (tests/tiny.py), for a quick look

The same load twice, each on a fresh local Ray Serve deployment of lorakit (replicas.py): --replicas 1 (fixed),
then --replicas 1..MAX autoscaled with --target-queue. The load is serve_load.py's: `--requests` greedy chat
requests from `--concurrency` clients, each to the next of `--adapters` random LoRA adapters (serve_load's) in
turn, here over HTTP through Ray Serve's proxy. Per mode: requests/s, completion tokens/s, p50/p95 latency,
errors, and the most replicas running during the load (Ray's serve status, sampled every 0.5 s). The answers of
both modes must be the same (greedy decoding), or the numbers do not count (exit 1). Needs lorakit[ray].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_load import load, random_adapters  # bench/, where this script runs from

from lorakit.errors import LorakitError
from lorakit.options import ServeOptions
from lorakit.serve import replicas


def running_replicas() -> int:
    from ray import serve

    from lorakit.serve.deployments import APP

    states = serve.status().applications[APP].deployments["Engine"].replica_states
    return sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")


def one_mode(opts: ServeOptions, models: list[str], args: argparse.Namespace) -> dict:
    """Deploy with `opts`, run the load, sample the replicas running meanwhile, take it all down."""
    t0 = time.perf_counter()
    replicas.start(opts)
    started = time.perf_counter() - t0
    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            seen.append((time.perf_counter(), running_replicas()))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        t1 = time.perf_counter()
        out = asyncio.run(load(f"http://127.0.0.1:{opts.port}", models, args.requests, args.concurrency,
                               args.max_tokens))  # fmt: skip
    finally:
        done.set()
        sampler.join()
        replicas.stop(opts)
    most = max((n for _, n in seen), default=1)
    more = next((round(t - t1, 1) for t, n in seen if n > 1), None)
    return {**out, "start_s": round(started, 1), "most_replicas": most, "second_replica_after_s": more}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model, or `tiny` (tests/tiny.py)")
    p.add_argument("--adapters", type=int, default=2, help="random LoRA adapters the requests go to in turn (0: base)")
    p.add_argument("--requests", type=int, default=96, help="total requests per mode")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--max-replicas", type=int, default=2, help="autoscaled mode: --replicas 1..MAX")
    p.add_argument("--target-queue", type=float, default=1.0, help="autoscaled mode: --target-queue")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="--replica-cpus of both modes")
    p.add_argument("--upscale-delay", type=float, default=2.0, help="autoscaled mode: --upscale-delay")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
            from tiny import save_tiny

            model = str(save_tiny(Path(tmp) / "tiny"))
        adapters = random_adapters(model, args.adapters, tmp) if args.adapters else {}
        common = {"model": model, "served_model_name": "base", "adapters": adapters, "replica_cpus": args.replica_cpus}
        modes = {
            "fixed_1": ServeOptions(**common, replicas="1", port=free_port()),
            f"autoscaled_1_to_{args.max_replicas}": ServeOptions(
                **common,
                replicas=f"1..{args.max_replicas}",
                target_queue=args.target_queue,
                upscale_delay_s=args.upscale_delay,
                port=free_port(),
            ),
        }
        out = {}
        try:
            for name, opts in modes.items():
                out[name] = one_mode(opts, list(adapters) or ["base"], args)
        except LorakitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    answers = [r.pop("answers") for r in out.values()]
    fixed, scaled = out.values()
    out["same_answers"] = answers[0] == answers[1]
    out["autoscaled_vs_fixed_requests_per_s"] = round(scaled["requests_per_s"] / fixed["requests_per_s"], 2)
    out["model"] = args.model
    print(json.dumps(out, indent=1))
    if not out["same_answers"]:
        print("error: the two modes answered differently (see same_answers): the numbers do not count", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
