"""The explorer's run list (`GET /v1/lorakit/runs`) over run folders written by hand: each run described on its
own (a malformed file leaves its part out with a note, a run that cannot be described is listed with its error),
never from the network, and described again only when one of its files changed."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lorakit import sources, tracking
from lorakit.serve import explorer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count to 3"}]
EVAL = {
    "models": {"base": {"exact_match": 0.0}, "run": {"exact_match": 1.0}},
    "examples": [{"id": 0, "prompt": CHAT, "reference": "0 1 2", "outputs": {"base": "1", "run": "0 1 2"}}],
}
METRICS = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]


def make_run(root: Path, data: dict | None = None, evals: dict | None = EVAL) -> Path:
    """A run folder as `lorakit train` (and `lorakit eval`) leave it, with a stand-in adapter."""
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_text("{}")
    data = data or {"train": str(root / "train.jsonl"), "eval": 0.5}
    (root / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": data, "output_dir": str(root)}))
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (root / "summary.json").write_text(json.dumps({"tokens_per_s": 10.0, "final_train_loss": 1.5}))
    if evals is not None:
        (root / "eval").mkdir()
        (root / "eval" / "eval.json").write_text(json.dumps(evals))
    return root


def rows(path: Path, n: int) -> str:
    """A data file of `n` rows: "count to i" answered "0 1 .. i-1" (the first row, with no answer)."""
    lines = (json.dumps({"prompt": f"count to {i}", "completion": " ".join(map(str, range(i)))}) for i in range(n))
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def client(adapters: dict[str, Path]) -> TestClient:
    """The explorer's routes over a server that serves `adapters` (name -> folder), as the registry lists them."""
    app = FastAPI()
    registry = SimpleNamespace(known={name: (path, True, "fp") for name, path in adapters.items()})
    explorer.add_routes(app, SimpleNamespace(registry=registry))
    return TestClient(app, raise_server_exceptions=False)


def listed(http: TestClient) -> dict[str, dict]:
    got = http.get("/v1/lorakit/runs")
    assert got.status_code == 200, got.text
    return {run["name"]: run for run in got.json()["runs"]}


# ---- item 4: one malformed run file leaves the other runs (and the rest of its own run) listed ----
MALFORMED_EVAL = {
    "a list": ("eval/eval.json", "[1, 2]", "not an object"),
    "not lorakit's": ("eval/eval.json", json.dumps({"foo": 1}), "'models'"),
    "an example without prompt": (
        "eval/eval.json",
        json.dumps({**EVAL, "examples": [{"id": 0, "reference": "0 1 2"}]}),
        "example 1 has no 'prompt'",
    ),
    "a prompt that is not a chat": (
        "eval/eval.json",
        json.dumps({**EVAL, "examples": [{"id": 0, "prompt": 5, "reference": None}]}),
        "example 1 has no 'prompt'",
    ),
    "models that are not objects": ("eval/eval.json", json.dumps({**EVAL, "models": {"base": 1}}), "'models'"),
}


@pytest.mark.parametrize("case", MALFORMED_EVAL)
def test_an_eval_json_not_lorakits_leaves_out_the_eval_with_a_note(tmp_path, case):
    name, text, why = MALFORMED_EVAL[case]
    good, bad = make_run(tmp_path / "good"), make_run(tmp_path / "bad")
    (bad / name).write_text(text)
    runs = listed(client({"good": good / "adapter", "bad": bad / "adapter"}))
    assert runs["good"]["eval"]["models"] == EVAL["models"] and runs["good"]["notes"] == []
    assert runs["bad"]["eval"] is None
    assert [n for n in runs["bad"]["notes"] if n.startswith("eval/eval.json:") and why in n], runs["bad"]["notes"]
    assert runs["bad"]["metrics"] == METRICS and runs["bad"]["summary"]["tokens_per_s"] == 10.0, "the rest is shown"


@pytest.mark.parametrize("line", ["5", '"text"', "[1, 2]", '{"loss": 1.0}', '{"step": "3", "loss": 1.0}'])
def test_a_metrics_line_that_is_not_a_steps_record_is_left_out_with_a_note(tmp_path, line):
    good, bad = make_run(tmp_path / "good"), make_run(tmp_path / "bad")
    with open(bad / "metrics.jsonl", "a") as f:
        f.write(line + "\n" + json.dumps({"step": 3, "loss": 1.2}) + "\n")
    runs = listed(client({"good": good / "adapter", "bad": bad / "adapter"}))
    assert runs["good"]["metrics"] == METRICS
    assert runs["bad"]["metrics"] == [*METRICS, {"step": 3, "loss": 1.2}]
    assert runs["bad"]["notes"] == ["metrics.jsonl: 1 line(s) are not a step's record, left out"]


@pytest.mark.parametrize(
    ("text", "why"),
    [("model: [tiny\n", "config.yaml: not readable as YAML"), ("- 1\n- 2\n", "config.yaml: not a run config")],
)
def test_a_run_that_cannot_be_described_is_listed_with_its_error_until_it_is_fixed(tmp_path, text, why):
    good, bad = make_run(tmp_path / "good"), make_run(tmp_path / "bad")
    fine = (bad / "config.yaml").read_text()
    (bad / "config.yaml").write_text(text)
    http = client({"good": good / "adapter", "bad": bad / "adapter"})
    runs = listed(http)
    assert runs["good"]["eval"]["models"] == EVAL["models"]
    assert runs["bad"]["error"].startswith(why) and runs["bad"]["folder"] == str(bad)
    (bad / "config.yaml").write_text(fine)
    assert listed(http)["bad"]["config"]["model"] == "tiny", "the fixed file is read again"


# ---- item 10: described from local files only, and again only when a file changed ----
@pytest.mark.parametrize("hub", ["train", "eval"])
def test_a_hub_dataset_id_in_the_config_is_never_fetched(tmp_path, monkeypatch, hub):
    fetched = []
    monkeypatch.setattr(sources, "_read_hub", lambda name, *a: fetched.append(name) or 1 / 0)
    local = rows(tmp_path / "rows.jsonl", 8)
    data = {"train": "someorg/train-set", "eval": 0.25} if hub == "train" else {"train": local, "eval": "org/held"}
    run = make_run(tmp_path / "run", data, evals=None)
    runs = listed(client({"run": run / "adapter"}))
    assert fetched == [] and runs["run"]["examples"] == [] and runs["run"]["metrics"] == METRICS


def test_a_run_is_read_again_only_when_one_of_its_files_changed(tmp_path, monkeypatch):
    reads = {"data": 0, "metrics": 0}

    def counting(what, read):
        def counted(*args, **kwargs):
            reads[what] += 1
            return read(*args, **kwargs)

        return counted

    monkeypatch.setattr(sources, "read", counting("data", sources.read))
    monkeypatch.setattr(tracking, "read", counting("metrics", tracking.read))
    held = rows(tmp_path / "held.jsonl", 3)
    run = make_run(tmp_path / "run", {"train": rows(tmp_path / "train.jsonl", 8), "eval": held}, evals=None)
    http = client({"run": run / "adapter"})
    first = listed(http)["run"]
    assert [ex["reference"] for ex in first["examples"]] == [None, "0", "0 1"], "from the local eval file"
    assert listed(http)["run"] == first and reads == {"data": 1, "metrics": 1}, "unchanged: nothing read again"

    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.2}) + "\n")
    with open(held, "a") as f:
        f.write(json.dumps({"prompt": "count to 3", "completion": "0 1 2"}) + "\n")
    again = listed(http)["run"]
    assert again["metrics"][-1] == {"step": 3, "loss": 1.2} and again["examples"][-1]["reference"] == "0 1 2"
    assert reads == {"data": 2, "metrics": 2}
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL))  # a file that was absent appears
    assert listed(http)["run"]["examples"] == [{"prompt": CHAT, "reference": "0 1 2"}]
