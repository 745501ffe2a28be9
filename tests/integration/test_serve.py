"""`lorakit serve` in process, driven by the official openai client (no port polling, no sleeps).

Most tests go through FastAPI's TestClient; the streaming hot-reload test runs a real uvicorn in a thread
on a socket bound beforehand, so the client can connect before the server loop starts.
"""

import asyncio
import importlib.util
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from openai import OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import cli
from lorakit.errors import LorakitError
from lorakit.export import vllm
from lorakit.generate import generate
from lorakit.serve import multi_lora, server
from lorakit.serve import protocol as p
from tiny import save_tiny

MSGS = [{"role": "user", "content": "the quick brown fox"}]
CHATS = [
    MSGS,
    [{"role": "user", "content": "What is the capital of France? Explain like I am five."}],
    [{"role": "system", "content": "be polite"}, {"role": "user", "content": "sum of two numbers"}],
]


def make_adapter(base_dir: Path, out: Path, r: int, targets: list[str], seed: int) -> Path:
    """A LoRA with random non-zero B weights, published atomically as `lorakit train` does."""
    torch.manual_seed(seed)
    net = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False),
    )
    tmp = out.with_name(f".{out.name}.tmp")
    net.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny(tmp / "base")
    make_adapter(base, tmp / "adapters" / "a", 4, ["q_proj", "v_proj"], 1)
    make_adapter(base, tmp / "adapters" / "b", 8, ["gate_proj", "up_proj", "down_proj"], 2)
    return tmp, base


def start(world, adapters_dir=None, **kw):
    tmp, base = world
    opts = server.ServeOptions(
        model=str(base), served_model_name="base", adapters_dir=str(adapters_dir or tmp / "adapters"), **kw
    )
    app, serving = server.build(opts)
    http = TestClient(app)
    client = OpenAI(
        base_url="http://testserver/v1", api_key=kw.get("api_key") or "none", http_client=http, max_retries=0
    )
    return client, serving, http


def offline(base: Path, adapter: Path | None, chats=(MSGS,), n: int = 8) -> list[str]:
    """The reference: lorakit.generate on plain transformers/peft, greedy."""
    net = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter)
    return generate(net, AutoTokenizer.from_pretrained(base), list(chats), max_new_tokens=n)


def chat(serving, model, msgs=MSGS, **kw):
    req = p.ChatCompletionRequest(model=model, messages=msgs, **{"max_tokens": 8, "temperature": 0, **kw})
    return asyncio.run(serving.chat(req)).choices[0].message.content


def test_models_chat_completions_and_streaming_match_offline_peft(world):
    tmp, base = world
    client, _, http = start(world)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "a", "b"}
    assert models["a"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None
    outs = {}
    for name, adapter in (("base", None), ("a", tmp / "adapters" / "a"), ("b", tmp / "adapters" / "b")):
        r = client.chat.completions.create(model=name, messages=MSGS, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == offline(base, adapter)[0]
        assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
        chunks = list(
            client.chat.completions.create(
                model=name,
                messages=MSGS,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
        outs[name] = r.choices[0].message.content
    assert len(set(outs.values())) == 3, "each adapter answers differently"
    parts = client.chat.completions.create(
        model="a",
        max_tokens=8,
        temperature=0,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "the quick "}, {"type": "text", "text": "brown fox"}]}
        ],
    )
    assert parts.choices[0].message.content == outs["a"], "content parts are joined"
    c = client.completions.create(model="a", prompt=["the quick brown", "hello"], max_tokens=5, temperature=0)
    s = list(client.completions.create(model="a", prompt="the quick brown", max_tokens=5, temperature=0, stream=True))
    assert c.choices[0].text == "".join(x.choices[0].text for x in s) and c.usage.completion_tokens == 10
    n2 = client.chat.completions.create(model="b", messages=MSGS, max_tokens=4, temperature=0.8, seed=3, n=2)
    again = client.chat.completions.create(model="b", messages=MSGS, max_tokens=4, temperature=0.8, seed=3, n=2)
    assert len(n2.choices) == 2 and n2.usage.completion_tokens == 8
    assert [x.message.content for x in n2.choices] == [x.message.content for x in again.choices], "seeded sampling"
    stop = client.chat.completions.create(model="a", messages=MSGS, max_tokens=8, temperature=0, stop=[outs["a"][2:4]])
    assert stop.choices[0].message.content == outs["a"][: outs["a"].find(outs["a"][2:4])]
    assert stop.choices[0].finish_reason == "stop"
    metrics = http.get("/metrics").text
    assert 'lorakit_requests_total{model="a"}' in metrics and "lorakit_queue_depth 0" in metrics
    assert 'lorakit_request_latency_seconds_count{model="b"} 4' in metrics
    assert 'lorakit_completion_tokens_total{model="base"} 16' in metrics and "lorakit_adapters_loaded 2" in metrics


def test_mixed_adapter_batch_equals_offline_one_by_one(world, monkeypatch):
    tmp, base = world
    used = []  # the batched multi-adapter LoRA computes the mixed steps (not peft's per-row loop)
    real = multi_lora.rows
    monkeypatch.setattr(multi_lora, "rows", lambda net, rows: used.append(list(rows)) or real(net, rows))
    # A long window: the engine starts once max_batch requests are there, so they surely share one batch.
    _, serving, _ = start(world, max_batch=6, batch_window_ms=60_000)
    rows = [(m, c) for m in ("a", "base", "b") for c in CHATS[:2]]

    async def together():
        reqs = [p.ChatCompletionRequest(model=m, messages=c, max_tokens=6, temperature=0) for m, c in rows]
        return await asyncio.gather(*(serving.chat(r) for r in reqs))

    batched = [r.choices[0].message.content for r in asyncio.run(together())]
    assert serving.engine.batches == 1, "all six rows, of three adapters and two prompt lengths, in one batch"
    expected = {
        m: offline(base, None if m == "base" else tmp / "adapters" / m, CHATS[:2], 6) for m in ("a", "b", "base")
    }
    assert batched == [expected[m][CHATS.index(c)] for m, c in rows]
    assert used and len(used[0]) == 6 and used[0].count(None) == 2 and len(set(used[0]) - {None}) == 2


def test_a_request_joins_rows_already_decoding(world):
    tmp, base = world
    _, serving, _ = start(world, max_batch=4, batch_window_ms=0)
    done = {k: threading.Event() for k in "xy"}
    first = p.ChatCompletionRequest(model="a", messages=CHATS[1], max_tokens=10, temperature=0)
    second = p.ChatCompletionRequest(model="b", messages=CHATS[2], max_tokens=6, temperature=0)
    [x] = serving.chat_jobs(first)
    [y] = serving.chat_jobs(second)
    y.emit = lambda text, end, reason: end and done["y"].set()

    def on_x(text: str, end: bool, reason: str | None) -> None:
        if not done["y"].is_set() and not getattr(on_x, "sent", False):
            on_x.sent = True
            serving.engine.submit(y)  # arrives while x is decoding
        if end:
            done["x"].set()

    x.emit = on_x
    serving.engine.submit(x)
    assert done["x"].wait(60) and done["y"].wait(60)
    assert serving.engine.batches == 1 and serving.engine.joined == 1
    assert x.text == offline(base, tmp / "adapters" / "a", [CHATS[1]], 10)[0]
    assert y.text == offline(base, tmp / "adapters" / "b", [CHATS[2]], 6)[0]


def test_batching_off_switches_the_active_adapter_per_request(world):
    tmp, base = world
    _, serving, _ = start(world, batching="off")
    for name in ("a", "base", "b", "a"):
        assert chat(serving, name) == offline(base, None if name == "base" else tmp / "adapters" / name)[0]
    assert serving.engine.joined == 0


@contextmanager
def uvicorn_in_thread(app):
    """A real server on a socket bound (and listening) before it starts: connections wait in the backlog."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_hot_reload_while_requests_stream(world, tmp_path, monkeypatch):
    tmp, base = world
    adapters = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters", adapters)
    # The three streams start together (max_batch 3, a long window) and are held after their first token
    # until the reload is done, so they are surely in flight during it.
    app, serving = server.build(
        server.ServeOptions(
            model=str(base), served_model_name="base", adapters_dir=str(adapters), max_batch=3, batch_window_ms=60_000
        )
    )
    held, go, step = threading.Event(), threading.Event(), serving.engine._step

    def gated(rows):
        held.set()
        assert go.wait(60)
        return step(rows)

    monkeypatch.setattr(serving.engine, "_step", gated)
    watcher = server.watch(serving, adapters, interval_s=None)  # only the wake event (what SIGHUP sets) scans
    old = {m: offline(base, adapters / m, [CHATS[1]], 40)[0] for m in ("a", "b")}
    texts, failures = {}, []

    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)

        def stream(model: str, key: str) -> None:
            try:
                chunks = client.chat.completions.create(
                    model=model, messages=CHATS[1], max_tokens=40, temperature=0, stream=True
                )
                texts[key] = "".join(c.choices[0].delta.content or "" for c in chunks)
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=stream, args=(m, k)) for k, m in (("a", "a"), ("a2", "a"), ("b", "b"))]
        for t in threads:
            t.start()
        assert held.wait(60)
        serving.engine.window_s = 0.0  # later requests start without waiting for company
        old_internal = serving.registry.active["a"].internal
        make_adapter(base, adapters / "a", 4, ["q_proj", "v_proj"], 99)  # retrained: new weights, same name
        watcher.wake.set()
        assert watcher.scanned.wait(60)
        assert serving.registry.active["a"].internal != old_internal, "the public name switched"
        assert old_internal in serving.registry.net.peft_config, "the old version stays while streams use it"
        go.set()
        fresh = client.chat.completions.create(model="a", messages=CHATS[1], max_tokens=40, temperature=0)
        for t in threads:
            t.join(60)
    watcher.stop.set()
    assert not failures, failures
    assert texts == {"a": old["a"], "a2": old["a"], "b": old["b"]}, "requests in flight finish on the old weights"
    new = offline(base, adapters / "a", [CHATS[1]], 40)[0]
    assert fresh.choices[0].message.content == new != old["a"], "new requests get the new weights"
    assert old_internal not in serving.registry.net.peft_config, "and the old version is gone once unused"


def test_a_client_that_hangs_up_on_a_plain_request_stops_its_row(world, monkeypatch):
    _, base = world
    app, serving = server.build(server.ServeOptions(model=str(base), served_model_name="base"))
    held, go, step = threading.Event(), threading.Event(), serving.engine._step

    def gated(rows):  # the first decoding step waits until the client has hung up and the server noticed
        if not held.is_set():
            held.set()
            assert go.wait(60)
        return step(rows)

    jobs, left, real_run = [], threading.Event(), serving.run

    async def watched_run(batch):
        jobs.extend(batch)
        try:
            async with aclosing(real_run(batch)) as events:
                async for event in events:
                    yield event
        finally:
            left.set()

    monkeypatch.setattr(serving.engine, "_step", gated)
    monkeypatch.setattr(serving, "run", watched_run)
    with uvicorn_in_thread(app) as url:
        body = json.dumps({"model": "base", "messages": MSGS, "max_tokens": 200, "temperature": 0}).encode()
        port = int(url.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert held.wait(60)
        assert left.wait(60), "the server noticed the hang-up while the row was decoding"
        go.set()
        # Served after the abandoned row was settled (they share the next decoding step).
        OpenAI(base_url=url, api_key="none", max_retries=0).chat.completions.create(
            model="base", messages=MSGS, max_tokens=2
        )
    assert jobs[0].finish_reason == "cancelled" and jobs[0].completion_tokens < 200
    assert serving.stats.errors[499] == 1


def test_old_version_lives_until_unused_and_broken_versions_never_replace_it(world, tmp_path):
    tmp, base = world
    adapters = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters", adapters)
    _, serving, http = start(world, adapters_dir=adapters)
    req = p.ChatCompletionRequest(model="a", messages=MSGS, max_tokens=8, temperature=0)
    in_flight = serving.chat_jobs(req)  # pins version 1 of "a"
    old_internal = in_flight[0].adapter
    make_adapter(base, adapters / "a", 4, ["q_proj", "v_proj"], 99)
    assert serving.registry.scan(adapters) == ["a"]
    assert old_internal in serving.registry.net.peft_config, "old version kept while a request uses it"

    async def finish():
        async with aclosing(serving.run(in_flight)) as events:
            return "".join([e[1] async for e in events])

    assert asyncio.run(finish()) == offline(base, tmp / "adapters" / "a")[0], "finished on the old weights"
    assert old_internal not in serving.registry.net.peft_config, "old version freed once unused"
    fresh = chat(serving, "a")
    assert fresh == offline(base, adapters / "a")[0]
    # A half-written or broken version never replaces the working one; the error shows in /v1/models.
    (adapters / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert serving.registry.scan(adapters) == [] and serving.registry.scan(adapters) == [], "no retry loop"
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "error" in models["a"] and models["a"]["loaded"]
    assert chat(serving, "a") == fresh


def test_a_broken_adapter_leaves_the_model_as_it_was(world, tmp_path):
    tmp, base = world
    adapters = tmp_path / "adapters"
    make_adapter(base, adapters / "half", 4, ["q_proj", "v_proj"], 5)
    (adapters / "half" / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # half-written upload
    _, serving, http = start(world, adapters_dir=adapters)  # the only adapter fails: the base stays plain
    assert "half" in serving.registry.errors and not hasattr(serving.registry.net, "peft_config")
    assert not any("lora" in n for n, _ in serving.registry.net.named_modules())
    assert chat(serving, "base") == offline(base, None)[0]
    shutil.copytree(tmp / "adapters" / "a", adapters / "sql-v1.5")  # a dotted name, as versions often are
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "sql-v1.5", "lora_path": "sql-v1.5"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "half"})
    assert r.status_code == 400
    assert list(serving.registry.net.peft_config) == [serving.registry.active["sql-v1.5"].internal], (
        "the failed version left nothing behind"
    )
    assert chat(serving, "sql-v1.5") == offline(base, tmp / "adapters" / "a")[0]
    assert chat(serving, "base") == offline(base, None)[0]


def test_requests_for_an_evicted_adapter_share_one_reload(world):
    _, serving, _ = start(world, max_adapters=1)
    assert "a" not in serving.registry.active
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: serving.registry.acquire("a"), range(4)))
    assert len({v.internal for v in versions}) == 1 and versions[0].users == 4
    for v in versions:
        serving.registry.release(v)


def test_a_stream_left_before_it_started_releases_its_adapter(world):
    _, serving, _ = start(world)
    req = p.ChatCompletionRequest(model="a", messages=MSGS, max_tokens=4, n=2, stream=True)

    async def leave_at_the_first_role_chunk():
        chunks = await serving.chat(req)
        await anext(chunks)
        await chunks.aclose()

    asyncio.run(leave_at_the_first_role_chunk())
    assert serving.registry.active["a"].users == 0


def test_metrics_counts_are_exact_integers(world):
    _, serving, http = start(world)
    chat(serving, "a")
    serving.stats.models["a"].completion_tokens = 1_234_567
    text = http.get("/metrics").text
    assert 'lorakit_completion_tokens_total{model="a"} 1234567\n' in text
    assert 'lorakit_requests_total{model="a"} 1\n' in text


def test_unloading_every_adapter_leaves_the_base_serving(world):
    tmp, base = world
    client, serving, http = start(world)
    for name in ("a", "b"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    r = client.chat.completions.create(model="base", messages=MSGS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == offline(base, None)[0]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"}).status_code == 200
    assert chat(serving, "b") == offline(base, tmp / "adapters" / "b")[0]


def test_lru_eviction_reloads_on_demand_and_unload(world):
    tmp, base = world
    client, serving, http = start(world, max_adapters=1)
    assert list(serving.registry.active) == ["b"], "cap applied at start: a loaded first, then evicted"
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert not models["a"]["loaded"] and models["b"]["loaded"], "evicted adapters stay listed"
    assert chat(serving, "a") == offline(base, tmp / "adapters" / "a")[0], "an evicted adapter loads again on demand"
    assert list(serving.registry.active) == ["a"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a"})
    assert r.status_code == 200, r.text
    assert list(serving.registry.active) == ["a2"] and serving.registry.scan(tmp / "adapters") == [], (
        "a rescan does not bring evicted adapters back"
    )
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="a2", messages=MSGS, max_tokens=2)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404


def test_a_client_that_leaves_cancels_its_row(world):
    _, serving, _ = start(world)
    req = p.ChatCompletionRequest(model="a", messages=MSGS, max_tokens=200, temperature=0)
    [job] = serving.chat_jobs(req)

    async def leave_after_first_token():
        async with aclosing(serving.run([job])) as events:
            await anext(events)
            serving.engine.lock.acquire()  # hold the engine at its next forward while the client leaves
        serving.engine.lock.release()

    asyncio.run(leave_after_first_token())
    chat(serving, "b")  # served after the cancelled row was settled
    assert job.finish_reason == "cancelled" and job.completion_tokens < 200


def test_paths_outside_the_adapters_folder_and_pickles_are_refused(world, tmp_path):
    tmp, base = world
    adapters = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters", adapters)
    _, serving, http = start(world, adapters_dir=adapters)
    outside = make_adapter(base, tmp_path / "outside", 4, ["q_proj"], 5)
    (adapters / "sneaky").symlink_to(outside, target_is_directory=True)
    (adapters / "half").mkdir()
    shutil.copy(adapters / "a" / "adapter_config.json", adapters / "half")
    (adapters / "half" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in ("../outside", str(outside), "sneaky", "half", "a/../../outside"):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (path, r.text)
    (adapters / "pickled").mkdir()
    shutil.copy(adapters / "a" / "adapter_config.json", adapters / "pickled")
    (adapters / "pickled" / "adapter_model.bin").write_bytes(b"pickle")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "pickled"})
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nothing"}).status_code == 404
    assert "x" not in serving.registry.known
    # Without --adapters-dir nothing can be loaded at run time.
    app, _ = server.build(server.ServeOptions(model=str(base), adapters={"a": str(adapters / "a")}))
    r = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters / "b")})
    assert r.status_code == 403


def test_bad_inputs_are_4xx_in_openai_shape_and_the_server_keeps_serving(world):
    client, _, http = start(world, api_key="secret", max_tokens_limit=64, max_body_bytes=4096, max_model_len=256)
    headers = {"Authorization": "Bearer secret", "content-type": "application/json"}
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http).models.list()
    r = http.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="ghost", messages=MSGS, max_tokens=2)
    assert e.value.body["param"] == "model"
    for kwargs in (
        {"messages": []},
        {"max_tokens": 0},
        {"max_tokens": -3},
        {"max_tokens": 65},
        {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 8},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"temperature": 5},
        {"n": 0},
        {"logprobs": True},
        {"stop": ["x"] * 17},
        {"extra_body": {"frequency_penalty": 0.5}},
        {"seed": 2**64},
        {"response_format": {"type": "json_object"}},
    ):
        with pytest.raises(openai.BadRequestError, match="Error code: 400"):
            client.chat.completions.create(model="a", **{"messages": MSGS, "max_tokens": 4, **kwargs})
            pytest.fail(f"accepted {kwargs}")
    with pytest.raises(openai.BadRequestError, match="not supported by lorakit serve: logprobs") as e:
        client.chat.completions.create(model="a", messages=MSGS, max_tokens=2, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="prompt must not be an empty list"):
        client.completions.create(model="a", prompt=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="over 64 completions"):
        client.completions.create(model="a", prompt=["hi"] * 9, n=8, max_tokens=2)
    # "Off" values of unsupported fields and explicit nulls are what many clients send: accepted.
    r = http.post(
        "/v1/chat/completions",
        headers=headers,
        json={
            "model": "a",
            "messages": MSGS,
            "max_tokens": 2,
            "temperature": None,
            "top_p": None,
            "n": None,
            "stream": None,
            "tools": [],
            "logit_bias": {},
            "logprobs": False,
            "top_logprobs": 0,
            "presence_penalty": 0,
        },
    )
    assert r.status_code == 200, r.text
    # Without max_tokens, the answer may fill the rest of the context (256 here), not default past it.
    long_prompt = [{"role": "user", "content": "word " * 100}]  # about 210 tokens of the 256
    r = client.chat.completions.create(model="a", messages=long_prompt, temperature=0)
    assert r.usage.prompt_tokens + 64 > 256, "the default max_tokens (64 here) would not fit"
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 256 and r.choices[0].finish_reason in ("length", "stop")
    assert http.post("/v1/completions", content=b"x" * 5000, headers=headers).status_code == 413
    chunked = http.post("/v1/completions", content=iter([b"x" * 3000] * 2), headers=headers)  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == 413
    assert http.get("/v1/nothing", headers=headers).json()["error"]["code"] == 404
    ok = client.chat.completions.create(model="a", messages=MSGS, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None
    metrics = http.get("/metrics", headers=headers).text
    assert 'lorakit_request_errors_total{status="400"}' in metrics and 'status="413"} 2' in metrics


def test_a_row_that_fails_ends_alone_and_tiny_temperatures_work(world):
    tmp, base = world
    _, serving, _ = start(world, max_batch=4, batch_window_ms=60_000)
    reqs = [p.ChatCompletionRequest(model=m, messages=MSGS, max_tokens=8, temperature=0) for m in ("a", "b")]
    jobs = [job for r in reqs for job in serving.chat_jobs(r)]
    jobs[1].temperature = float("nan")  # its sampling fails at the first token
    serving.engine.window_s = 0.0

    async def run_all():
        async with aclosing(serving.run(jobs)) as events:
            return [e async for e in events]

    asyncio.run(run_all())
    assert jobs[1].error and jobs[0].error is None
    assert jobs[0].text == offline(base, tmp / "adapters" / "a")[0], "its batch mate finished as if alone"
    assert all(v.users == 0 for v in serving.registry.active.values())
    assert chat(serving, "a", temperature=1e-45, seed=3) == offline(base, tmp / "adapters" / "a")[0]


def test_engine_failure_is_a_500_for_that_request_only(world, monkeypatch, caplog):
    client, serving, _ = start(world)
    real = serving.engine._forward
    calls = iter([RuntimeError("boom")])

    def flaky(*args):
        err = next(calls, None)
        if err:
            raise err
        return real(*args)

    monkeypatch.setattr(serving.engine, "_forward", flaky)
    with (
        caplog.at_level(logging.ERROR, logger="lorakit.serve"),
        pytest.raises(openai.InternalServerError, match="boom"),
    ):
        client.chat.completions.create(model="a", messages=MSGS, max_tokens=3)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in logged), "the cause, with its traceback"
    assert any("answered 500: generation failed: RuntimeError: boom" in r.getMessage() for r in logged)
    assert client.chat.completions.create(model="a", messages=MSGS, max_tokens=3).choices[0].message.content is not None


def test_vllm_engine_command_and_missing_vllm(world, capsys, monkeypatch):
    tmp, base = world
    opts = server.ServeOptions(
        model=str(base),
        served_model_name="tiny",
        adapters={"b": str(tmp / "adapters" / "b")},
        port=9000,
        api_key="k",
        max_model_len=512,
        dtype="bf16",
        max_adapters=3,
    )
    monkeypatch.setattr(vllm, "python", lambda given: "/envs/vllm/bin/python")
    launch, secret = server.vllm_command(opts)
    cmd = launch.argv
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and cmd[cmd.index("--max-cpu-loras") + 1] == "3"
    assert cmd[cmd.index("--max-loras") + 1] == "1", "one adapter here"
    assert cmd[:5] == ["/envs/vllm/bin/python", "-m", vllm.SERVER, "--model", str(Path(base).resolve())]
    assert f"b={(tmp / 'adapters' / 'b').resolve()}" in cmd and "--enable-lora" in cmd and "9000" in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny" and cmd[cmd.index("--max-model-len") + 1] == "512"
    assert secret == {"VLLM_API_KEY": "k"} and "k" not in cmd, "the key stays out of the process list"
    assert "k" not in launch.env.values() and "VLLM_CPU_KVCACHE_SPACE" in launch.env
    # Adapter "a" has rank 4, which vLLM serves under --max-lora-rank 8 (issue 30: it was refused).
    launch, _ = server.vllm_command(server.ServeOptions(model=str(base), adapters_dir=str(tmp / "adapters")))
    assert launch.argv[launch.argv.index("--max-lora-rank") + 1] == "8"
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp / "adapters"))  # no `vllm` program there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert (
        cli.main(["serve", "--model", str(base), "--adapter", f"b={tmp / 'adapters' / 'b'}", "--engine", "vllm"]) == 2
    )
    err = capsys.readouterr().err
    assert "vLLM is not installed for this Python" in err and "--vllm-python PATH or $LORAKIT_VLLM_PYTHON" in err


class Execed(Exception):
    pass


def test_vllm_engine_execs_vllms_server_with_the_python_that_has_it(world, tmp_path, monkeypatch, capsys):
    """--engine vllm ran a `vllm` program, which vllm-cpu's fails at start, and which outside an activated venv is
    not on PATH though the python has vllm (issue 31, items 1 and 2): it execs vLLM's server module with that
    python, in the environment it printed, where the caller's own setting of vLLM's variables wins."""
    tmp, base = world
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))  # this python has vllm
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # and no `vllm` program is on PATH
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    execs = []

    def exec_(path, argv, env):
        execs.append((path, argv, env))
        raise Execed

    monkeypatch.setattr(os, "execve", exec_)
    monkeypatch.setattr(os, "execvpe", exec_)
    with pytest.raises(Execed):
        cli.main(["serve", "--model", str(base), "--adapter", f"b={tmp / 'adapters' / 'b'}", "--engine", "vllm"])
    [(path, argv, env)] = execs
    assert path == argv[0] == sys.executable and argv[1:5] == ["-m", vllm.SERVER, "--model", str(base.resolve())]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7" and env["PATH"] == str(tmp_path / "bin")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert shlex.split(printed)[1:] == argv and shlex.split(printed)[0].startswith("VLLM_CPU_KVCACHE_SPACE=")


def test_vllm_engine_takes_force_and_the_adapters_folder_as_lorakits_engine_does(world, tmp_path, monkeypatch):
    """--force reaches vLLM's checks, and a dot-folder of --adapters-dir (an upload in progress) is no adapter."""
    tmp, base = world
    monkeypatch.setattr(vllm, "python", lambda given: "python")
    folder = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters" / "b", folder / "renamed")
    meta = folder / "renamed" / "adapter_config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_model_name_or_path": "someone/else"}))
    shutil.copytree(tmp / "adapters" / "a", folder / ".upload-tmp")  # an upload in progress: not served
    opts = server.ServeOptions(model=str(base), adapters_dir=str(folder))
    with pytest.raises(LorakitError, match="was trained on 'someone/else'"):
        server.vllm_command(opts)
    launch, _ = server.vllm_command(server.ServeOptions(model=str(base), adapters_dir=str(folder), force=True))
    cmd = launch.argv
    assert cmd[cmd.index("--lora-modules") + 1] == f"renamed={(folder / 'renamed').resolve()}"
    assert not any(".upload-tmp" in arg for arg in cmd)


def test_a_run_config_whose_run_did_not_finish_is_said_not_served_as_the_base_alone(world, tmp_path):
    _, base = world
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {base}\ndata: {{train: x.jsonl}}\noutput_dir: {tmp_path / 'sql'}\n")
    (tmp_path / "sql").mkdir()
    shutil.copy(cfg, tmp_path / "sql" / "config.yaml")  # what an interrupted run leaves: its config, no adapter/
    with pytest.raises(LorakitError, match="did not finish: it has no adapter/ yet"):
        server.build(server.ServeOptions(model=str(cfg)))


def test_a_run_config_serves_its_base_and_trained_adapter(world, tmp_path, capsys):
    tmp, base = world
    shutil.copytree(tmp / "adapters" / "b", tmp_path / "sql" / "adapter")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {base}\ndata: {{train: x.jsonl}}\noutput_dir: {tmp_path / 'sql'}\n")
    _, serving = server.build(server.ServeOptions(model=str(cfg)))
    assert serving.served_name == str(base) and list(serving.registry.known) == ["sql"]
    assert chat(serving, "sql") == offline(base, tmp / "adapters" / "b")[0]
    assert cli.main(["serve", "--model", str(base), "--watch"]) == 2, "--watch without --adapters-dir"
    assert "--watch needs --adapters-dir" in capsys.readouterr().err


def test_watcher_picks_up_a_training_run_folder(world, tmp_path):
    _, base = world
    runs = tmp_path / "runs"
    runs.mkdir()
    _, serving = server.build(server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(runs)))
    watcher = server.watch(serving, runs, interval_s=None)
    make_adapter(base, runs / "sql" / "adapter", 8, ["q_proj", "v_proj"], 7)  # what `lorakit train` writes
    watcher.wake.set()  # what SIGHUP does
    assert watcher.scanned.wait(timeout=60)
    watcher.stop.set()
    assert serving.registry.active["sql"].path == (runs / "sql" / "adapter").resolve()
    assert chat(serving, "sql", max_tokens=6) == offline(base, runs / "sql" / "adapter", n=6)[0]


def unmixable_adapters(world, folder: Path) -> Path:
    """Beside a plain LoRA: one that trains lm_head in full (modules_to_save) and a DoRA adapter."""
    tmp, base = world
    shutil.copytree(tmp / "adapters" / "a", folder / "a")
    for name, extra in (("saved", {"modules_to_save": ["lm_head"]}), ("dora", {"use_dora": True})):
        torch.manual_seed(5)
        net = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra),
        )
        if name == "saved":
            with torch.no_grad():  # a trained head: answers that differ from the base's
                net.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
        net.save_pretrained(folder / name)
    return folder


def test_adapters_that_cannot_share_a_batch_never_break_the_others(world, tmp_path):
    """modules_to_save made every request to the other adapters a 500 (KeyError 'a@1'), and a DoRA adapter's
    rows failed their whole batch: with mixed batches both are refused at load, with the reason."""
    _, base = world
    folder = unmixable_adapters(world, tmp_path / "adapters")
    app, serving = server.build(
        server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(folder))
    )
    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        models = {m.id: m.model_extra for m in client.models.list().data}
        for name, why in (
            ("saved", "trains whole modules (['lm_head'], modules_to_save)"),
            ("dora", "is a DoRA adapter"),
        ):
            assert (
                not models[name]["loaded"]
                and why in models[name]["error"]
                and "--batching off" in models[name]["error"]
            )
            with pytest.raises(openai.NotFoundError, match=f"adapter {name} is not loaded: .*cannot join mixed"):
                client.chat.completions.create(model=name, messages=MSGS, max_tokens=4, temperature=0)
        for _ in range(2):  # one at a time, then together with the base
            r = client.chat.completions.create(model="a", messages=MSGS, max_tokens=8, temperature=0)
            assert r.choices[0].message.content == offline(base, folder / "a")[0]
        with ThreadPoolExecutor(2) as pool:
            both = pool.map(
                lambda m: client.chat.completions.create(model=m, messages=MSGS, max_tokens=8, temperature=0),
                ["a", "base"],
            )
            assert [x.choices[0].message.content for x in both] == [
                offline(base, folder / "a")[0],
                offline(base, None)[0],
            ]
        r = httpx.post(url.removesuffix("/v1") + "/v1/load_lora_adapter", json={"lora_name": "d2", "lora_path": "dora"})
        assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"]
    serving.close()
    # One request at a time (the active adapter switched per request) runs them, as peft does offline.
    app, serving = server.build(
        server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(folder), batching="off")
    )
    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        answers = {}
        for name in ("a", "saved", "dora", "base"):
            r = client.chat.completions.create(model=name, messages=MSGS, max_tokens=8, temperature=0)
            answers[name] = r.choices[0].message.content
            assert answers[name] == offline(base, None if name == "base" else folder / name)[0], name
        assert answers["saved"] != answers["base"], "the trained head is used"
    serving.close()


def test_an_adapter_named_like_the_base_is_refused(world, tmp_path):
    tmp, base = world
    with pytest.raises(LorakitError, match=r"--adapter base=.*'base' is the base model's name"):
        server.build(
            server.ServeOptions(
                model=str(base), served_model_name="base", adapters={"base": str(tmp / "adapters" / "a")}
            )
        )
    shutil.copytree(tmp / "adapters" / "a", tmp_path / "adapters" / "base")
    app, serving = server.build(
        server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(tmp_path / "adapters"))
    )
    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        listed = [m.id for m in client.models.list().data]
        assert listed == ["base"], "listed once, as the base"
        assert (
            client.chat.completions.create(model="base", messages=MSGS, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
            == offline(base, None)[0]
        )
        r = httpx.post(
            url.removesuffix("/v1") + "/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": "base"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    serving.close()


def test_serve_checks_each_adapters_base_like_eval_and_merge(world, tmp_path):
    tmp, base = world
    other = tmp_path / "adapters" / "other"
    shutil.copytree(tmp / "adapters" / "a", other)
    meta = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**meta, "base_model_name_or_path": "someone/else"}))
    with pytest.raises(LorakitError, match=r"--adapter x=.*was trained on 'someone/else', not on the base"):
        server.build(server.ServeOptions(model=str(base), adapters={"x": str(other)}))
    _, forced = server.build(server.ServeOptions(model=str(base), adapters={"x": str(other)}, force=True))
    assert list(forced.registry.active) == ["x"], "--force accepts it, as in eval and merge"
    forced.close()
    shutil.copytree(tmp / "adapters" / "a", tmp_path / "adapters" / "a")
    app, serving = server.build(
        server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(tmp_path / "adapters"))
    )
    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        models = {m.id: m.model_extra for m in client.models.list().data}
        assert "was trained on 'someone/else'" in models["other"]["error"] and models["a"]["loaded"]
        r = httpx.post(url.removesuffix("/v1") + "/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": "other"})
        assert r.status_code == 400 and "was trained on 'someone/else'" in r.json()["error"]["message"]
        # A reload whose new files name another base keeps the working version.
        before = (
            client.chat.completions.create(model="a", messages=MSGS, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )
        shutil.rmtree(tmp_path / "adapters" / "a")
        shutil.copytree(other, tmp_path / "adapters" / "a")
        assert serving.registry.scan(tmp_path / "adapters") == []
        assert "was trained on" in serving.registry.errors["a"]
        after = (
            client.chat.completions.create(model="a", messages=MSGS, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )
        assert after == before
    serving.close()


def test_a_busy_port_fails_before_loading_and_before_saying_serving(world, capsys):
    _, base = world
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        assert cli.main(["serve", "--model", str(base), "--port", str(port)]) == 2
    finally:
        busy.close()
    out, err = capsys.readouterr()
    assert "serving" not in out and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_an_empty_prompt_is_answered_as_openai_does(world):
    app, serving = server.build(server.ServeOptions(model=str(world[1]), served_model_name="base"))
    with uvicorn_in_thread(app) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        r = client.completions.create(model="base", prompt="", max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens == 3 and r.choices[0].text
    serving.close()


@pytest.fixture(scope="module")
def trained_runs(world, tmp_path_factory):
    """Run folders of one real training step each: a QLoRA run and a LoRA run on the tiny base."""
    from lorakit import config, train

    _, base = world
    tmp = tmp_path_factory.mktemp("runs")
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"{i} {i}"}) + "\n" for i in range(8)))
    for method in ("qlora", "lora"):
        cfg = config.validate({
            "model": str(base), "method": method, "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
            "data": {"train": str(rows), "max_length": 32, "cache_dir": str(tmp / "cache")},
            "train": {"max_steps": 1, "batch_size": 2}, "output_dir": str(tmp / method),
        })  # fmt: skip
        train.run(cfg, progress=False)
    return {method: tmp / method for method in ("qlora", "lora")}


def is_4bit(serving) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in serving.registry.net.modules())


def test_a_qlora_adapter_is_served_on_the_4bit_base_it_was_trained_on_or_said_to_differ(world, trained_runs, caplog):
    """--model BASE --adapter q=QLORA_RUN: the 4-bit base, as eval takes it. Beside a LoRA adapter the base is
    unquantized, and each load of a QLoRA adapter says it answers differently there: at start and at run time."""
    _, base = world
    caplog.set_level(logging.WARNING, logger="lorakit.serve")

    def warnings() -> list[str]:
        return [r.message for r in caplog.records if "trained with QLoRA" in r.message]

    _, alone = server.build(server.ServeOptions(model=str(base), adapters={"q": str(trained_runs["qlora"])}))
    assert is_4bit(alone), "auto took the unquantized base for a QLoRA adapter"
    alone.close()
    assert warnings() == []

    both = {"q": str(trained_runs["qlora"]), "l": str(trained_runs["lora"])}
    _, mixed = server.build(server.ServeOptions(model=str(base), adapters=both))
    assert not is_4bit(mixed)
    [said] = warnings()
    assert said.startswith("adapter q was trained with QLoRA on the 4-bit base, but the base here is unquantized")
    assert "--base-precision 4bit" in said
    caplog.clear()
    mixed.registry.load("q2", trained_runs["qlora"] / "adapter", confined=False)  # as /v1/load_lora_adapter does
    mixed.registry.load("l2", trained_runs["lora"] / "adapter", confined=False)
    assert [w.split(" was ")[0] for w in warnings()] == ["adapter q2"]
    mixed.close()
