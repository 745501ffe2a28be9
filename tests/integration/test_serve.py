"""`lorakit serve` in process, driven by the official openai client (no ports, no sleeps)."""

import asyncio
import os
import shutil
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import cli, serve
from lorakit.generate import generate
from lorakit.serve import protocol as p
from tiny import save_tiny

MSGS = [{"role": "user", "content": "the quick brown fox"}]


def make_adapter(base_dir: Path, out: Path, r: int, targets: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                         LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    tmp = out.with_name(f".{out.name}.tmp")
    net.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic, as lorakit train writes adapters
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny(tmp / "base")
    make_adapter(base, tmp / "adapters" / "a", 4, ["q_proj", "v_proj"], 1)
    make_adapter(base, tmp / "adapters" / "b", 8, ["gate_proj", "up_proj", "down_proj"], 2)
    return tmp, base


def start(world, **kw):
    tmp, base = world
    opts = serve.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(tmp / "adapters"), **kw)
    app, serving = serve.build(opts)
    http = TestClient(app)
    return OpenAI(base_url="http://testserver/v1", api_key=kw.get("api_key") or "none", http_client=http), serving, http


def offline(base: Path, adapter: Path | None, n: int = 8) -> str:
    tok = AutoTokenizer.from_pretrained(base)
    net = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter)
    return generate(net, tok, [MSGS], max_new_tokens=n)[0]


def test_models_chat_completions_and_streaming_match_offline_peft(world):
    tmp, base = world
    client, serving, _ = start(world)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "a", "b"}
    assert models["a"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None
    outs = {}
    for name, adapter in (("base", None), ("a", tmp / "adapters" / "a"), ("b", tmp / "adapters" / "b")):
        r = client.chat.completions.create(model=name, messages=MSGS, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == offline(base, adapter)
        assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
        chunks = list(client.chat.completions.create(model=name, messages=MSGS, max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
        outs[name] = r.choices[0].message.content
    assert len(set(outs.values())) == 3, "each adapter answers differently"
    c = client.completions.create(model="a", prompt="the quick brown", max_tokens=5, temperature=0)
    s = list(client.completions.create(model="a", prompt="the quick brown", max_tokens=5, temperature=0, stream=True))
    assert c.choices[0].text == "".join(x.choices[0].text for x in s) and c.usage.completion_tokens == 5
    n2 = client.chat.completions.create(model="b", messages=MSGS, max_tokens=4, temperature=0.8, seed=3, n=2)
    assert len(n2.choices) == 2
    again = client.chat.completions.create(model="b", messages=MSGS, max_tokens=4, temperature=0.8, seed=3, n=2)
    assert [x.message.content for x in n2.choices] == [x.message.content for x in again.choices], "seeded sampling"
    stop = client.chat.completions.create(model="a", messages=MSGS, max_tokens=8, temperature=0, stop=[outs["a"][2:4]])
    assert stop.choices[0].message.content == outs["a"][:outs["a"].find(outs["a"][2:4])]
    assert stop.choices[0].finish_reason == "stop"
    metrics = client._client.get("http://testserver/metrics").text
    assert 'lorakit_requests_total{model="a"}' in metrics and "lorakit_queue_depth" in metrics


def test_mixed_adapter_batch_equals_one_by_one(world):
    _, serving, _ = start(world, max_batch=8)
    reqs = [p.ChatCompletionRequest(model=m, messages=MSGS, max_tokens=6, temperature=0) for m in ("a", "base", "b", "a")]

    async def together():
        return await asyncio.gather(*(serving.complete(r, [serving.chat_prompt(r)], chat=True) for r in reqs))

    async def alone():
        return [await serving.complete(r, [serving.chat_prompt(r)], chat=True) for r in reqs]

    before = serving.engine.batches
    batched = asyncio.run(together())
    assert serving.engine.batches - before < len(reqs), "requests shared a batch"
    single = asyncio.run(alone())
    text = lambda rs: [r["choices"][0]["message"]["content"] for r in rs]  # noqa: E731
    assert text(batched) == text(single)


def test_hot_reload_keeps_in_flight_requests_and_serves_new_weights(world, tmp_path):
    tmp, base = world
    adapters = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters", adapters)
    app, serving = serve.build(serve.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(adapters)))
    req = p.ChatCompletionRequest(model="a", messages=MSGS, max_tokens=8, temperature=0)
    old_answer = offline(base, adapters / "a")
    in_flight = serving.prepare(req, [serving.chat_prompt(req)])  # pins version 1 of "a"
    old_internal = in_flight[0].adapter
    make_adapter(base, adapters / "a", 4, ["q_proj", "v_proj"], 99)  # retrain: new weights, same name
    assert serving.registry.scan(adapters) == ["a"]
    assert old_internal in serving.registry.net.peft_config, "old version kept while a request uses it"

    async def finish():
        return [item async for item in serving.run(in_flight)]

    events = asyncio.run(finish())
    assert "".join(e[1] for e in events) == old_answer, "the in-flight request finished on the old weights"
    assert old_internal not in serving.registry.net.peft_config, "old version freed once unused"
    fresh = asyncio.run(serving.complete(req, [serving.chat_prompt(req)], chat=True))
    assert fresh["choices"][0]["message"]["content"] == offline(base, adapters / "a") != old_answer

    # A half-written or broken version never replaces the working one.
    (adapters / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    serving.registry.scan(adapters)
    models = {m["id"]: m for m in serving.models()["data"]}
    assert "error" in models["a"]
    again = asyncio.run(serving.complete(req, [serving.chat_prompt(req)], chat=True))
    assert again["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_load_unload_and_lru(world, tmp_path):
    tmp, base = world
    client, serving, http = start(world, max_adapters=1)
    assert list(serving.registry.active) == ["b"], "LRU cap applied at start: a was loaded first, then evicted"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a"})
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == ["base", "a2"], "b was least recently used"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="a2", messages=MSGS, max_tokens=2)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404


def test_path_traversal_symlinks_and_pickle_are_refused(world, tmp_path):
    tmp, base = world
    _, serving, http = start(world)
    outside = make_adapter(base, tmp_path / "outside", 4, ["q_proj"], 5)
    link = tmp / "adapters" / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in ("../base", str(outside), "sneaky"):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert r.status_code == 403, (path, r.text)
    finally:
        link.unlink()
    pickled = tmp / "adapters" / "pickled"
    pickled.mkdir()
    shutil.copy(tmp / "adapters" / "a" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    try:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "pickled"})
        assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    finally:
        shutil.rmtree(pickled)


def test_bad_inputs_are_4xx_and_the_server_keeps_serving(world):
    client, serving, http = start(world, api_key="secret", max_tokens_limit=64)
    headers = {"Authorization": "Bearer secret"}
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http).models.list()
    r = http.post("/v1/chat/completions", content=b"{not json", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ghost", messages=MSGS, max_tokens=2)
    for kwargs in ({"messages": []}, {"messages": MSGS, "max_tokens": 0}, {"messages": MSGS, "max_tokens": 65},
                   {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="a", **{"max_tokens": 4, **kwargs})
    big = http.post("/v1/completions", content=b"x" * (2 << 20), headers={**headers, "content-type": "application/json"})
    assert big.status_code == 413
    ok = client.chat.completions.create(model="a", messages=MSGS, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None


def test_vllm_engine_command_and_missing_vllm(world, capsys, monkeypatch):
    tmp, base = world
    opts = serve.ServeOptions(model=str(base), served_model_name="tiny", adapters={"b": str(tmp / "adapters" / "b")},
                              port=9000, api_key="k")
    cmd = serve.vllm_command(opts)
    assert cmd[:3] == ["vllm", "serve", str(Path(base).resolve())] and "--enable-lora" in cmd
    assert f"b={(tmp / 'adapters' / 'b').resolve()}" in cmd and "--served-model-name" in cmd and "9000" in cmd
    with pytest.raises(Exception, match="rank 4 is not one vLLM accepts"):  # adapter "a" has rank 4
        serve.vllm_command(serve.ServeOptions(model=str(base), adapters_dir=str(tmp / "adapters")))
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["serve", "--model", str(base), "--adapter", f"b={tmp / 'adapters' / 'b'}", "--engine", "vllm"]) == 2
    assert "needs vLLM" in capsys.readouterr().err


def test_watcher_picks_up_a_training_run_folder(world, tmp_path):
    tmp, base = world
    runs = tmp_path / "runs"
    runs.mkdir()
    _, serving = serve.build(serve.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(runs)))
    watcher = serve.watch(serving, runs, interval_s=3600)  # only the wake event triggers a scan here
    make_adapter(base, runs / "sql" / "adapter", 8, ["q_proj", "v_proj"], 7)  # what `lorakit train` writes
    watcher.wake.set()  # what SIGHUP does
    assert watcher.scanned.wait(timeout=60)
    assert "sql" in serving.registry.active and serving.registry.active["sql"].path == (runs / "sql" / "adapter").resolve()
    req = p.ChatCompletionRequest(model="sql", messages=MSGS, max_tokens=6, temperature=0)
    out = asyncio.run(serving.complete(req, [serving.chat_prompt(req)], chat=True))
    assert out["choices"][0]["message"]["content"] == offline(base, runs / "sql" / "adapter", 6)
