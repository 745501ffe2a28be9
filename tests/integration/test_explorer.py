"""The explorer page in a real browser (Playwright driving Chromium headless) against a real server: columns
that stream the API's own answers, adapters that appear and fail live, the runs view, and the API key."""

import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from openai import OpenAI
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit import config, evaluate, train
from lorakit.serve import server
from tiny import save_tiny

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; make test installs it)"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; make test installs it as root)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    yield tab
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        tab.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
    context.close()


def make_adapter(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, two adapters, and a real (tiny) training run folder with its eval."""
    tmp = tmp_path_factory.mktemp("explorer")
    base = save_tiny(tmp / "base")
    make_adapter(base, tmp / "adapters" / "a", 1)
    make_adapter(base, tmp / "adapters" / "b", 2, ("gate_proj", "up_proj", "down_proj"))
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"count to {i}", "completion": " ".join(map(str, range(i)))}) + "\n"
                            for i in range(2, 14)))  # fmt: skip
    cfg = config.validate({"model": str(base), "output_dir": str(tmp / "adapters" / "tinyrun"),
                           "data": {"train": str(rows), "eval": 0.25, "cache_dir": str(tmp / "cache")},
                           "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "eval_every": 3}})  # fmt: skip
    train.run(cfg, progress=False)
    evaluate.run(cfg, evaluate.EvalOptions(max_new_tokens=4, metrics=["exact_match", "token_f1"]))
    return tmp, base


@contextmanager
def serving(world, **options):
    """The real server (uvicorn) on a loopback socket that listens before it starts: no polling for readiness."""
    tmp, base = world
    app, serving = server.build(server.ServeOptions(model=str(base), served_model_name="base",
                                                    adapters_dir=str(tmp / "adapters"), **options))  # fmt: skip
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    http = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", serving
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        sock.close()
        serving.close()


def column(page, model: str):
    return page.locator(f'.column[data-model="{model}"][data-state="done"] .current')


def test_three_models_answer_side_by_side_as_the_api_does(world, page):
    with serving(world) as (url, _):
        page.goto(url)
        for model in ("base", "a", "b"):
            assert page.locator(f'input[data-model="{model}"]').is_checked(), "the base and the adapters start chosen"
        page.locator('input[data-model="tinyrun"]').uncheck()
        page.fill("#prompt", "the quick brown fox")
        page.click("#send")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for model in ("base", "a", "b"):
            shown = column(page, model).inner_text()
            asked = [{"role": "user", "content": "the quick brown fox"}]
            api = client.chat.completions.create(model=model, messages=asked, max_tokens=64, temperature=0)
            api = api.choices[0].message.content
            assert shown == api, model
            stats = page.locator(f'.column[data-model="{model}"] .stats').inner_text()
            assert "first token" in stats and "tokens/s" in stats and "finish:" in stats
        assert page.locator(".column.differs").count() >= 1, "an adapter's answer is marked where it differs"


def test_adapters_appear_and_fail_live(world, page, tmp_path):
    tmp, base = world
    with serving(world) as (url, running):
        page.goto(url)
        page.locator('input[data-model="a"]').wait_for()
        make_adapter(base, tmp / "adapters" / "c", 3)
        try:
            assert (
                httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"}).status_code == 200
            )
            page.locator('input[data-model="c"]').wait_for()  # no reload: the page follows the server
            broken = tmp / "adapters" / "broken"
            shutil.copytree(tmp / "adapters" / "a", broken)
            (broken / "adapter_model.safetensors").write_bytes(b"not weights")
            running.registry.scan(tmp / "adapters")
            page.locator("#model-list label", has_text="broken").locator(".error").wait_for()
            assert page.locator('input[data-model="broken"]').is_disabled()
        finally:
            shutil.rmtree(tmp / "adapters" / "c", ignore_errors=True)
            shutil.rmtree(tmp / "adapters" / "broken", ignore_errors=True)


def test_the_runs_view_shows_the_loss_curve_and_the_eval_table(world, page):
    with serving(world) as (url, _):
        page.goto(url)
        page.click("#tab-runs")
        run = page.locator('.run[data-run="tinyrun"]')
        points = run.locator("polyline.train-loss").get_attribute("points")
        assert len(points.split()) == 6, "one point per logged step"
        assert run.locator("polyline.eval-loss").get_attribute("points").count(",") == 2, "two evaluations"
        table = run.locator("table.eval")
        assert table.locator("tbody tr").count() == 2 and "exact_match" in table.locator("thead").inner_text()
        page.click("#tab-compare")
        assert page.locator("#example optgroup").first.get_attribute("label") == "held out by tinyrun"


def test_the_api_key_is_asked_once_and_a_wrong_one_is_said(world, page):
    with serving(world, api_key="sesame") as (url, _):
        page.goto(url)
        page.locator("#key-dialog[open]").wait_for()
        page.fill("#key", "wrong")
        page.press("#key", "Enter")
        page.locator("#key-error", has_text="refused").wait_for()
        page.fill("#key", "sesame")
        page.press("#key", "Enter")
        page.locator('input[data-model="a"]').wait_for()
        assert page.evaluate("sessionStorage.getItem('lorakit-api-key')") == "sesame"


def test_no_ui_turns_the_page_off(world):
    app, running = server.build(server.ServeOptions(model=str(world[1]), no_ui=True))
    try:
        from fastapi.testclient import TestClient

        assert TestClient(app).get("/").status_code == 404
    finally:
        running.close()
