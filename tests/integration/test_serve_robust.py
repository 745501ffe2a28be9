"""`lorakit serve` against what a folder of uploads can hold (issue 30): a relative --adapters-dir, broken run
folders, tokenizers of another vocabulary, deleted adapters, and request text no tokenizer can encode. Each one is
that adapter's or that request's error alone: the server starts, keeps watching and serves the others.
"""

import json
import shutil
from pathlib import Path

import pytest
import test_serve
from test_serve import MSGS, chat, make_adapter, offline, start

from lorakit.serve import server
from tiny import CHATML, tiny_tokenizer

world = test_serve.world  # its tiny base and adapters a and b, built once for this module too


def broken_uploads(world, folder: Path) -> dict[str, str]:
    """Three run folders of `lorakit train` with a working adapter/ but a config.yaml that cannot be used: not
    YAML, a YAML list, and a link to a file outside the folder; and an adapter whose adapter_config.json is `{}`
    (no LoRA config). Returns name -> what their error must say."""
    tmp, _ = world
    for name in ("notyaml", "alist", "linked"):
        shutil.copytree(tmp / "adapters" / "a", folder / name / "adapter")
    shutil.copytree(tmp / "adapters" / "a", folder / "empty")
    (folder / "empty" / "adapter_config.json").write_text("{}")
    (folder / "notyaml" / "config.yaml").write_text("model: [unclosed\n")
    (folder / "alist" / "config.yaml").write_text("- model\n- data\n")
    secret = folder.parent / "elsewhere" / "secret.yaml"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("api_key: hunter2\n")
    (folder / "linked" / "config.yaml").symlink_to(secret)
    return {
        "notyaml": "not valid YAML",
        "alist": "must be a mapping",
        "linked": "links out of the adapters folder",
        "empty": "could not be loaded",
    }


def models_of(http) -> dict[str, dict]:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def test_a_relative_adapters_dir_loads_its_adapters_at_start_and_on_rescan(world, tmp_path, monkeypatch):
    tmp, base = world
    shutil.copytree(tmp / "adapters" / "a", tmp_path / "proj" / "ad" / "a")
    make_adapter(base, tmp_path / "proj" / "ad" / "sql" / "adapter", 4, ["q_proj"], 3)  # a run folder
    monkeypatch.chdir(tmp_path / "proj")
    _, serving, http = start(world, adapters_dir="ad")
    assert serving.registry.errors == {} and set(serving.registry.active) == {"a", "sql"}
    assert chat(serving, "a") == offline(base, tmp / "adapters" / "a")[0]
    watcher = server.watch(serving, Path("ad"), interval_s=None)  # as `serve --watch` calls it
    shutil.copytree(tmp / "adapters" / "b", Path("ad") / "late")
    watcher.wake.set()
    assert watcher.scanned.wait(timeout=60)
    watcher.stop.set()
    assert serving.registry.errors == {} and models_of(http)["late"]["loaded"]
    assert chat(serving, "late") == offline(base, tmp / "adapters" / "b")[0]


def test_broken_uploads_at_start_show_their_error_and_the_others_serve(world, tmp_path):
    tmp, base = world
    folder = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters" / "a", folder / "a")
    said = broken_uploads(world, folder)
    _, serving, http = start(world, adapters_dir=folder)
    models = models_of(http)
    assert models["a"]["loaded"] and chat(serving, "a") == offline(base, tmp / "adapters" / "a")[0]
    for name, why in said.items():
        assert not models[name]["loaded"] and why in models[name]["error"], (name, models[name])
        r = http.post("/v1/chat/completions", json={"model": name, "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 404 and "is not loaded" in r.json()["error"]["message"], r.text
    assert "hunter2" not in models["linked"]["error"] and "api_key" not in models["linked"]["error"]
    # Loaded at run time, each is a 400 saying why, and leaves the model as it was.
    for name, why in said.items():
        r = http.post("/v1/load_lora_adapter", json={"lora_name": f"{name}2", "lora_path": name})
        assert r.status_code == 400 and why in r.json()["error"]["message"], (name, r.text)
    assert list(serving.registry.net.peft_config) == [serving.registry.active["a"].internal]


def test_the_watcher_survives_broken_uploads_and_loads_what_comes_after(world, tmp_path):
    tmp, base = world
    folder = tmp_path / "adapters"
    folder.mkdir()
    _, serving, http = start(world, adapters_dir=folder)
    watcher = server.watch(serving, folder, interval_s=None)
    said = broken_uploads(world, folder)
    watcher.wake.set()  # what SIGHUP does
    assert watcher.scanned.wait(timeout=60), "the watcher died on a broken run folder"
    assert {n: why in serving.registry.errors[n] for n, why in said.items()} == dict.fromkeys(said, True)
    watcher.scanned.clear()
    shutil.copytree(tmp / "adapters" / "b", folder / "late")
    # A run config fixed is tried again: its fingerprint covers config.yaml.
    (folder / "notyaml" / "config.yaml").write_text(
        f"model: {base}\ndata: {{train: x.jsonl}}\noutput_dir: {folder / 'notyaml'}\n"
    )
    watcher.wake.set()
    assert watcher.scanned.wait(timeout=60)
    watcher.stop.set()
    models = models_of(http)
    assert models["late"]["loaded"] and models["notyaml"]["loaded"] and "error" not in models["notyaml"]
    assert not models["alist"]["loaded"] and "must be a mapping" in models["alist"]["error"]
    assert chat(serving, "late") == offline(base, tmp / "adapters" / "b")[0]


def test_the_watcher_outlives_any_exception_of_a_scan(world, tmp_path, monkeypatch, caplog):
    tmp, base = world
    folder = tmp_path / "adapters"
    folder.mkdir()
    _, serving, _ = start(world, adapters_dir=folder)
    scan, calls = serving.registry.scan, []

    def failing_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("a bug in a scan")
        return scan(path)

    monkeypatch.setattr(serving.registry, "scan", failing_once)
    watcher = server.watch(serving, folder, interval_s=None)
    watcher.wake.set()
    assert watcher.scanned.wait(timeout=60), "the watcher died"
    assert "a bug in a scan" in caplog.text
    watcher.scanned.clear()
    shutil.copytree(tmp / "adapters" / "a", folder / "late")
    watcher.wake.set()
    assert watcher.scanned.wait(timeout=60)
    watcher.stop.set()
    assert len(calls) == 2 and chat(serving, "late") == offline(base, tmp / "adapters" / "a")[0]


def save_tokenizer_with_an_added_token(folder: Path, template: str | None) -> None:
    """The tiny tokenizer plus one special token, whose id (640) is past the tiny base's 640 embeddings."""
    tok = tiny_tokenizer("chatml")
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(folder)


def test_an_adapter_whose_tokenizer_does_not_fit_the_base_is_refused_at_load(world, tmp_path):
    tmp, base = world
    folder = tmp_path / "adapters"
    for name in ("a", "tool", "added"):
        shutil.copytree(tmp / "adapters" / "a", folder / name)
    save_tokenizer_with_an_added_token(folder / "tool", "<|tool|>" + CHATML)  # its template renders the new id
    save_tokenizer_with_an_added_token(folder / "added", None)  # the base's template, another vocabulary
    _, serving, http = start(world, adapters_dir=folder)
    models = models_of(http)
    assert models["a"]["loaded"]
    for name in ("tool", "added"):
        assert not models[name]["loaded"], name
        assert "641 token ids, but the base has only 640 token embeddings" in models[name]["error"]
        r = http.post("/v1/chat/completions", json={"model": name, "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 404, r.text
        r = http.post("/v1/load_lora_adapter", json={"lora_name": f"{name}2", "lora_path": name})
        assert r.status_code == 400 and "token embeddings" in r.json()["error"]["message"], r.text
    assert chat(serving, "a") == offline(base, tmp / "adapters" / "a")[0]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("completions", {"model": "base", "prompt": "hi \ud800 there"}, "prompt"),
        ("completions", {"model": "base", "prompt": ["fine", "\udfff"]}, "prompt"),
        (
            "chat/completions",
            {"model": "base", "messages": [{"role": "user", "content": "hi \ud800"}]},
            "messages.0.content",
        ),
        (
            "chat/completions",
            {"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
            "messages.0.content",
        ),
        ("chat/completions", {"model": "base\ud800", "messages": MSGS}, "model"),  # a 404 would echo it
    ],
)
def test_a_lone_surrogate_in_request_text_is_a_400(world, path, body, param):
    _, serving, http = start(world)
    # JSON escapes carry the surrogate (json.dumps writes "\ud800"); a UTF-8 body cannot.
    r = http.post(
        f"/v1/{path}", content=json.dumps({**body, "max_tokens": 2}), headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "not valid Unicode text: a lone surrogate" in r.text, r.text
    assert chat(serving, "base") == offline(world[1], None)[0], "the server keeps serving"


def test_a_deleted_adapter_that_was_evicted_is_a_404_and_unlisted(world, tmp_path):
    tmp, base = world
    folder = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters", folder)
    _, serving, http = start(world, adapters_dir=folder, max_adapters=1)
    assert list(serving.registry.active) == ["b"] and "a" in models_of(http), "a was evicted, and stays listed"
    shutil.rmtree(folder / "a")
    r = http.post("/v1/chat/completions", json={"model": "a", "messages": MSGS, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
    assert "a" not in models_of(http) and "a" not in serving.registry.known
    assert serving.registry.scan(folder) == [], "a rescan does not bring it back"
    assert chat(serving, "b") == offline(base, tmp / "adapters" / "b")[0]
