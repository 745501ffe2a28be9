"""`lorakit serve --replicas` on a local Ray Serve cluster with the tiny model: it scales with the queue.

One test walks the life of a replicated server: a burst of streaming requests scales it from 1 to 2 replicas,
an adapter retrained during the burst reaches every replica, the replica removed after the burst finishes the
answer it is streaming, and the server is back to 1 replica. Every answer is compared with the single-process
server's greedy answer. Waits are on conditions (Ray's serve status, the router's reports) with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit.options import ServeOptions
from lorakit.serve import server
from lorakit.serve.adapters import fingerprint
from tiny import save_tiny

ray = pytest.importorskip("ray", reason="pip install 'lorakit[ray]' (make test-scale does)")
from ray import serve  # noqa: E402

from lorakit.serve import deployments, replicas  # noqa: E402

KEY = "scale-test-key"
STARTED = time.monotonic()
PROMPTS = ["the quick brown fox", "What is the capital of France?", "sum of two numbers", "Rewrite politely"]
SHORT = 24  # tokens of each burst answer
# The answer streaming while a replica is removed: the base's to this prompt runs to max_tokens (checked), which
# takes many seconds on a CPU, far longer than Ray takes to decide on the removal (--downscale-delay 3).
LONG, LONG_PROMPT = 1900, "Rewrite politely"


def make_adapter(base: Path, out: Path, r: int, seed: int) -> None:
    """A LoRA of random non-zero weights, published atomically as `lorakit train` does."""
    torch.manual_seed(seed)
    net = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    tmp = out.with_name(f".{out.name}.tmp")
    net.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def request(model: str, prompt: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


@dataclass
class Answer:
    model: str
    prompt: str
    sent: float  # time.monotonic() when sent
    replica: str | None = None
    text: str = ""
    finish: str | None = None
    done: bool = False  # the stream ended with [DONE]
    ended: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)


def stream(client: httpx.Client, answer: Answer, max_tokens: int) -> Answer:
    """One streaming chat request through the router, read to its end."""
    with client.stream("POST", "/v1/chat/completions", json=request(answer.model, answer.prompt, max_tokens)) as r:
        assert r.status_code == 200, r.read()
        answer.replica = r.headers["x-lorakit-replica"]
        answer.started.set()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                answer.done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                answer.text += choice["delta"].get("content") or ""
                answer.finish = choice["finish_reason"] or answer.finish
    answer.ended = time.monotonic()
    return answer


def references(base: Path, adapters: Path | None, prompts: list[str], max_tokens: int) -> dict[tuple[str, str], tuple]:
    """The single-process server's greedy answers: (model, prompt) -> (text, finish reason), for the base and each
    adapter."""
    opts = ServeOptions(
        model=str(base), served_model_name="base", adapters_dir=adapters and str(adapters), max_tokens_limit=LONG
    )
    app, serving = server.build(opts)
    with TestClient(app) as http:
        out = {}
        for model in ["base", *serving.registry.known]:
            for prompt in prompts:
                body = {**request(model, prompt, max_tokens), "stream": False}
                choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
                out[model, prompt] = choice["message"]["content"], choice["finish_reason"]
    return out


def say(what: str) -> None:
    """A step of the test, with the time since it started (in the output of a failure, or with -s)."""
    print(f"{time.monotonic() - STARTED:6.1f} s  {what}", flush=True)


def wait_for(what, condition, deadline_s: float):
    """Poll `condition` (Ray's serve status, the router's reports) until it holds; fail after deadline_s saying
    `what` (a string, or a function that says it then)."""
    end = time.monotonic() + deadline_s
    while not (result := condition()):
        assert time.monotonic() < end, f"not within {deadline_s:.0f} s: {what() if callable(what) else what}"
        time.sleep(0.2)
    return result


def engine_replicas() -> dict[str, int]:
    """How many Engine replicas are in each state (RUNNING, STARTING, STOPPING...)."""
    engine = serve.status().applications[deployments.APP].deployments["Engine"]
    return {getattr(state, "value", state): n for state, n in engine.replica_states.items() if n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    base = save_tiny(tmp / "base")
    make_adapter(base, tmp / "adapters" / "a", 4, seed=1)
    make_adapter(base, tmp / "adapters" / "b", 8, seed=2)
    make_adapter(base, tmp / "retrained" / "a", 4, seed=3)  # the next version of a, written in during the burst
    refs = references(base, tmp / "adapters", PROMPTS, SHORT)
    refs |= {("a2", p): t for (m, p), t in references(base, tmp / "retrained", PROMPTS, SHORT).items() if m == "a"}
    long = references(base, None, [LONG_PROMPT], LONG)["base", LONG_PROMPT]
    assert long[1] == "length", "the long answer runs to max_tokens"
    assert len({refs[m, PROMPTS[0]] for m in ("base", "a", "b", "a2")}) == 4, "every model answers differently"
    return tmp, base, refs, long


def test_replicas_scale_up_reload_drain_and_scale_down(world, monkeypatch):
    tmp, base, refs, long = world
    say("reference answers computed")
    # A test that fails with answers in flight stops within a minute, not Ray's drain of a real server's.
    monkeypatch.setattr(replicas, "DRAIN_S", 60.0)
    opts = ServeOptions(
        model=str(base),
        served_model_name="base",
        adapters_dir=str(tmp / "adapters"),
        watch=True,
        watch_interval_s=0.5,
        api_key=KEY,
        port=free_port(),
        replicas="1..2",
        target_queue=2,  # 2 answers streaming on 2 replicas is a queue for 1: one replica is removed under them
        upscale_delay_s=1.0,
        downscale_delay_s=3.0,
        max_batch=4,
        max_tokens_limit=LONG,
    )
    replicas.start(opts)
    say("Ray and the first replica up")
    url = f"http://127.0.0.1:{opts.port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    try:
        assert engine_replicas() == {"RUNNING": 1}
        assert httpx.get(f"{url}/v1/models").status_code == 401, "the API key is checked at the router"
        assert "<html" in httpx.get(f"{url}/").text.lower(), "the explorer page loads without the key"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a", "b"]
        answers = burst(client, opts, refs, tmp)
        say(f"burst over: {len(answers)} answers")
        drained = drain(client, long)
        say("long answers ended whole")
        wait_for("back to 1 replica", lambda: engine_replicas() == {"RUNNING": 1}, 60)
        say("back to 1 replica")
        sent = len(answers) + len(drained)
        assert all(a.done for a in answers + drained), "no answer lost or cut"
        counted = []  # what /metrics said, each time asked
        wait_for(
            lambda: f"/metrics counts all {sent} requests, the removed replica's too: {counted[-3:]}",
            lambda: counted.append(requests_counted(client.get("/metrics").text)) or counted[-1] == sent,
            10,
        )
        say("metrics summed")
        left = hang_up(client)
        wait_for("the row of the client that left stops", lambda: rows_running_since(client, left) == 0, 60)
        assert requests_counted(client.get("/metrics").text) == sent, "its answer was cut, not finished"
        say("the row of the client that left stopped")
    finally:
        client.close()
        replicas.stop(opts)


def burst(client: httpx.Client, opts: ServeOptions, refs: dict, tmp: Path) -> list[Answer]:
    """Stream short answers from 6 clients until 2 replicas serve; retrain adapter a meanwhile and go on until every
    replica reports its new files. Returns every answer, each checked against the single-process server's."""
    answers: list[Answer] = []
    stop = threading.Event()
    models = ["base", "a", "b"]

    def client_loop(i: int) -> None:
        n = i
        while not stop.is_set():
            answer = Answer(models[n % 3], PROMPTS[n % len(PROMPTS)], time.monotonic())
            answers.append(answer)
            stream(client, answer, SHORT)
            n += 1

    with ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client_loop, i) for i in range(6)]
        try:
            wait_for("a 2nd replica under the burst", lambda: engine_replicas().get("RUNNING", 0) >= 2, 300)
            say("2 replicas")
            wait_for("both replicas answer", lambda: len({a.replica for a in answers if a.done}) >= 2, 60)
            make_adapter(Path(opts.model), tmp / "adapters" / "a", 4, seed=3)  # retrained: new weights, same name
            new = fingerprint(tmp / "adapters" / "a")
            say("adapter a retrained")
            reloaded = wait_for(
                "every replica serves the retrained adapter",
                lambda: every_replica_has(client, "a", new),
                60,
            )
            wait_for(
                "answers of the new a",
                lambda: any(a.done and a.sent > reloaded and a.model == "a" for a in answers),
                30,
            )
        finally:
            stop.set()
            for c in clients:
                c.result()  # a client's failure fails the test
    assert len({a.replica for a in answers}) == 2
    for a in answers:
        want = {refs["a2", a.prompt]} if a.model == "a" and a.sent > reloaded else {refs[a.model, a.prompt]}
        if a.model == "a" and a.sent <= reloaded:
            want.add(refs["a2", a.prompt])  # sent while replicas were reloading: either version, whole
        assert (a.text, a.finish) in want, (a.model, a.prompt, a.replica)
    return answers


def every_replica_has(client: httpx.Client, adapter: str, files: str) -> float | None:
    """When every live replica (both of them) reports `adapter` at these files, the time; else None."""
    live = client.get("/v1/lorakit/replicas").json()["replicas"]
    ok = len(live) == 2 and all(r["adapters"].get(adapter, {}).get("fingerprint") == files for r in live.values())
    return time.monotonic() if ok else None


def drain(client: httpx.Client, long: str) -> list[Answer]:
    """Two long answers stream, one on each replica, while Ray removes a replica: both end whole."""
    watched: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            watched.append((time.monotonic(), engine_replicas()))
            time.sleep(0.1)

    with ThreadPoolExecutor(3) as pool:
        watcher = pool.submit(watch)
        first = Answer("base", LONG_PROMPT, time.monotonic())
        runs = [pool.submit(stream, client, first, LONG)]
        assert first.started.wait(60)
        second = Answer("base", LONG_PROMPT, time.monotonic())
        runs.append(pool.submit(stream, client, second, LONG))
        try:
            answers = [r.result(timeout=180) for r in runs]
        finally:
            done.set()
            watcher.result()
    assert first.replica != second.replica, "the two long answers stream from the two replicas"
    stopping = [t for t, states in watched if states.get("STOPPING")]
    assert stopping, f"a replica was removed while the long answers streamed: {watched[::10]}"
    assert all((a.text, a.finish) == long and a.done for a in answers), "each answer whole, the removed replica's too"
    assert min(a.ended for a in answers) > stopping[0], "the removal began while both answers were still streaming"
    return answers


def hang_up(client: httpx.Client) -> float:
    """Ask for a long streamed answer and leave after its first words; returns when."""
    with client.stream("POST", "/v1/chat/completions", json=request("base", LONG_PROMPT, LONG)) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert '"role": "assistant"' in next(lines) and '"content": ""' not in next(lines), "a first word"
    return time.monotonic()


def rows_running_since(client: httpx.Client, t: float) -> int | None:
    """The rows the replicas decode, as they reported after time `t`; None until every one has reported since."""
    live = client.get("/v1/lorakit/replicas").json()["replicas"].values()
    if any(r["reported_s_ago"] > time.monotonic() - t - 0.2 for r in live):  # 0.2 s: a report on its way at `t`
        return None
    rows = [line for r in live for line in r["metrics"].splitlines() if line.startswith("lorakit_running_rows ")]
    return sum(int(line.split()[1]) for line in rows)


def requests_counted(metrics: str) -> int:
    """The requests answered, over all models, in a /metrics text."""
    counts = [line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line.startswith("lorakit_requests_total{")]
    return sum(int(n) for n in counts)
