"""The explorer page in a real browser (Playwright driving Chromium headless) against a real server: columns
that stream the API's own answers, adapters that appear and fail live, the runs view, the runs' eval reports (only
lorakit's rendering, nothing read through a symlink out, shown in a sandbox out of the key's reach), and the API key."""

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

from lorakit import config, evaluate, report, train
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
def serving(world, adapters_dir: Path | None = None, **options):
    """The real server (uvicorn) on a loopback socket that listens before it starts: no polling for readiness."""
    tmp, base = world
    folder = str(adapters_dir or tmp / "adapters")
    app, serving = server.build(server.ServeOptions(model=str(base), served_model_name="base",
                                                    adapters_dir=folder, **options))  # fmt: skip
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


# ---- the run's eval report: lorakit's own rendering, nothing through a symlink out, shown in a sandbox ----
KEY = "sesame-7f3a"
SECRET = "SECRET-not-for-the-page"
# Reads the page's key, from the page that opened or framed it or from its own storage, and sends it out.
STEAL = (
    "var k; try { k = (window.opener || window.parent).sessionStorage.getItem('lorakit-api-key') } catch (e) {}"
    " try { k = k || sessionStorage.getItem('lorakit-api-key') } catch (e) {}"
    " document.title = 'key:' + k; fetch('/leak?key=' + k)"
)


def run_copy(world, adapters: Path, name: str) -> Path:
    """A copy of the world's trained run folder (adapter, config, metrics, eval) as adapters/NAME."""
    return Path(shutil.copytree(world[0] / "adapters" / "tinyrun", adapters / name))


def link_out(path: Path, target: Path, text: str) -> None:
    """Replace a file of a run folder by a symlink to `target`, outside the adapters folder."""
    target.write_text(text)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"})


def runs_view(page, url: str) -> None:
    """The page, given the key, showing the Runs view."""
    page.goto(url)
    page.locator("#key-dialog[open]").wait_for()
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    page.click("#tab-runs")


def open_report(page, url: str, run: str):
    """Open the run's eval.html from the Runs view (with the key); the frame it is shown in."""
    runs_view(page, url)
    page.locator(f'.run[data-run="{run}"] button', has_text="open eval.html").click()
    page.locator("#report-dialog[open]").wait_for()
    frame = page.frame_locator("#report-frame")
    frame.locator("h1").wait_for()
    return frame


def test_eval_html_is_lorakits_rendering_never_a_symlink_out(world, tmp_path):
    adapters = tmp_path / "adapters"
    run = run_copy(world, adapters, "r1")
    link_out(run / "eval" / "eval.html", tmp_path / "secret.html", SECRET)
    with serving(world, adapters_dir=adapters, api_key=KEY) as (url, _):
        got = get(url, "/v1/lorakit/runs/r1/eval.html")
    assert got.status_code == 200 and SECRET not in got.text
    assert got.text == report.to_html(json.loads((run / "eval" / "eval.json").read_text())), "rendered from eval.json"
    assert got.headers["content-security-policy"] == "sandbox allow-scripts", "an opaque origin, even opened directly"
    assert got.headers["x-content-type-options"] == "nosniff"


def test_run_files_symlinked_out_of_the_run_folder_are_not_read(world, tmp_path):
    adapters = tmp_path / "adapters"
    run = run_copy(world, adapters, "r2")
    evals = json.loads((run / "eval" / "eval.json").read_text())
    evals["examples"][0]["reference"] = SECRET
    link_out(run / "eval" / "eval.json", tmp_path / "eval.json", json.dumps(evals))
    link_out(run / "summary.json", tmp_path / "summary.json", json.dumps({"tokens_per_s": SECRET}))
    link_out(run / "metrics.jsonl", tmp_path / "metrics.jsonl", json.dumps({"step": 1, "loss": 1.0, "x": SECRET}))
    other = run_copy(world, adapters, "r3")
    link_out(other / "config.yaml", tmp_path / "config.yaml", (run / "config.yaml").read_text() + f"# {SECRET}\n")
    with serving(world, adapters_dir=adapters, api_key=KEY) as (url, _):
        page = get(url, "/v1/lorakit/runs/r2/eval.html")
        listed = get(url, "/v1/lorakit/runs")
    assert page.status_code == 404 and SECRET not in page.text
    assert "no eval report for r2" in page.json()["error"]["message"]
    assert SECRET not in listed.text
    assert [r["name"] for r in listed.json()["runs"]] == ["r2"], "r3's config.yaml is outside: not a run here"
    (r2,) = listed.json()["runs"]
    assert r2["eval"] is None and r2["summary"] is None and r2["metrics"] == []


def test_open_eval_html_shows_lorakits_report_in_a_sandbox_out_of_reach_of_the_key(world, page, tmp_path):
    adapters = tmp_path / "adapters"
    run = run_copy(world, adapters, "r1")
    (run / "eval" / "eval.html").write_text(f"<title>hand</title><p>HAND-WRITTEN PAGE</p><script>{STEAL}</script>")
    evals = json.loads((run / "eval" / "eval.json").read_text())
    injected = f'<img src=x onerror="{STEAL}">'
    first, second = evals["examples"][:2]
    adapter = list(evals["models"])[1]  # the first is the base
    first["id"], first["outputs"][adapter] = injected, injected  # changed: the adapter answers unlike the base
    second["outputs"] = dict.fromkeys(second["outputs"], "the same answer")  # unchanged
    (run / "eval" / "eval.json").write_text(json.dumps(evals))
    requests = []
    page.context.on("request", lambda r: requests.append(f"{r.url} {r.post_data or ''}"))
    with serving(world, adapters_dir=adapters, api_key=KEY) as (url, _):
        frame = open_report(page, url, "r1")
        shown = frame.locator("body").inner_text()
        assert "HAND-WRITTEN" not in shown and frame.locator("h1").inner_text() == "lorakit eval"
        assert shown.count(injected) == 2 and frame.locator("img").count() == 0, "the markup is text, in id and answer"
        unchanged = frame.locator(".example:not(.changed)").first
        assert unchanged.is_visible()
        frame.locator("#only-changed").check()  # the report's own script runs in its sandbox
        assert unchanged.is_hidden() and frame.locator(".example.changed").first.is_visible()
        report_frame = page.locator("#report-frame").element_handle().content_frame()
        for storage in ("window.parent.sessionStorage", "sessionStorage"):
            read = f"() => {{ try {{ return {storage}.getItem('lorakit-api-key'); }} catch (e) {{ return e.name; }} }}"
            assert report_frame.evaluate(read) == "SecurityError", f"{storage} is out of the report's reach"
        assert page.evaluate("sessionStorage.getItem('lorakit-api-key')") == KEY, "the page itself still has it"
        titles = [p.title() for p in page.context.pages] + [report_frame.evaluate("document.title")]
    assert len(page.context.pages) == 1, "no window opened (a window.open'ed page would have an opener)"
    assert not any(KEY in t for t in titles) and not any(KEY in r or "/leak" in r for r in requests)


def test_open_eval_html_says_why_there_is_no_report(world, page, tmp_path):
    adapters = tmp_path / "adapters"
    run = run_copy(world, adapters, "r1")
    evals = json.loads((run / "eval" / "eval.json").read_text())
    del evals["examples"][0]["outputs"]  # not what `lorakit eval` writes: the page still shows its table
    (run / "eval" / "eval.json").write_text(json.dumps(evals))
    (run / "eval" / "eval.html").unlink()
    with serving(world, adapters_dir=adapters, api_key=KEY) as (url, _):
        runs_view(page, url)
        card = page.locator('.run[data-run="r1"]')
        card.locator("button", has_text="open eval.html").click()
        failure = card.locator(".failure", has_text="no eval report for r1")
        failure.wait_for()
        assert "eval/eval.json written by `lorakit eval`" in failure.inner_text()
        assert not page.locator("#report-dialog").evaluate("d => d.open") and len(page.context.pages) == 1


def test_a_run_that_cannot_be_described_is_shown_with_its_error_beside_the_others(world, page, tmp_path):
    adapters = tmp_path / "adapters"
    run_copy(world, adapters, "good")
    odd, broken = run_copy(world, adapters, "odd"), run_copy(world, adapters, "broken")
    (odd / "eval" / "eval.json").write_text("[1, 2]")
    with open(odd / "metrics.jsonl", "a") as f:
        f.write("5\n")
    with serving(world, adapters_dir=adapters) as (url, _):
        (broken / "config.yaml").write_text("- rewritten while served\n")  # loaded at start, unreadable now
        page.goto(url)
        page.click("#tab-runs")
        page.locator('.run[data-run="good"] table.eval').wait_for()
        card = page.locator('.run[data-run="broken"]')
        assert card.locator(".failure").inner_text().startswith("config.yaml: not a run config")
        assert card.locator("svg").count() == 0 and card.locator("dl").count() == 0
        card, good = page.locator('.run[data-run="odd"]'), page.locator('.run[data-run="good"]')
        notes = card.locator(".failure").all_inner_texts()
        assert any(n.startswith("eval/eval.json: not an object") for n in notes), notes
        assert any(n.startswith("metrics.jsonl: 1 line(s)") for n in notes), notes
        curve = "polyline.train-loss"
        assert card.locator(curve).get_attribute("points") == good.locator(curve).get_attribute("points")
        assert card.locator("table.eval").count() == 0
        page.click("#tab-compare")
        labels = page.locator("#example optgroup").evaluate_all("groups => groups.map((g) => g.label)")
        assert "held out by good" in labels and "held out by broken" not in labels


def test_open_eval_html_of_an_adapter_named_with_a_slash(world, page):
    tmp, _ = world
    with serving(world, adapters={"team/sql": str(tmp / "adapters" / "tinyrun")}) as (url, _):
        (listed,) = [r for r in httpx.get(f"{url}/v1/lorakit/runs").json()["runs"] if r["name"] == "team/sql"]
        assert listed["eval"]["html"] == "/v1/lorakit/runs/team%2Fsql/eval.html"
        assert httpx.get(url + listed["eval"]["html"]).status_code == 200
        page.goto(url)
        page.click("#tab-runs")
        page.locator('.run[data-run="team/sql"] button', has_text="open eval.html").click()
        page.frame_locator("#report-frame").locator("table.metrics").wait_for()
        assert page.locator("#report-title").inner_text() == "lorakit eval of team/sql"


def test_loading_the_page_gets_no_error_response_and_a_favicon(world, page):
    responses = []
    page.on("response", lambda r: responses.append((r.status, r.url)))
    with serving(world) as (url, running):
        page.goto(url)
        page.locator('input[data-model="a"]').wait_for()
        page.locator('.run[data-run="tinyrun"]').wait_for(state="attached")  # the runs were read too
        assert [(status, u) for status, u in responses if status >= 400] == []
        assert dict(running.stats.errors) == {}, "the server answered no request with an error either"
        icon = page.locator("link[rel=icon]").get_attribute("href")
        got = httpx.get(url + icon)
    assert got.status_code == 200 and got.headers["content-type"].startswith("image/svg+xml")
