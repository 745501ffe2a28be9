"""Each adapter is served with the chat template and end-of-turn ids it was trained with, in mixed batches.

The base here has no chat template and a base-model EOS (<|endoftext|>); three adapters are trained on it
(one step each, real `lorakit train`) with data.chat_template llama2, chatml and alpaca. The chatml fallback
closes a turn with <|im_end|> before EOS, the others with EOS alone, so the rows' stop ids differ too.
"""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from lorakit import config, evaluate, render, train
from lorakit.export import vllm
from lorakit.serve import protocol as p
from lorakit.serve import server
from tiny import tiny_model, tiny_tokenizer

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
TEMPLATES = ("llama2", "chatml", "alpaca")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("templates")
    tok = tiny_tokenizer(None, eos="<|endoftext|>")
    base = tmp / "base"
    tiny_model("llama", tok).save_pretrained(base)
    tok.save_pretrained(base)
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"{i} {i}"}) + "\n" for i in range(4)))
    out = {}
    for name in TEMPLATES:
        cfg = config.validate({
            "model": str(base), "method": "lora", "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
            "data": {"train": str(rows), "max_length": 64, "cache_dir": str(tmp / "cache"), "chat_template": name},
            "train": {"max_steps": 1, "batch_size": 2}, "output_dir": str(tmp / "runs" / name),
        })  # fmt: skip
        train.run(cfg, progress=False)
        out[name] = (cfg, tmp / "runs" / name)
    return base, out


def eval_prompt(cfg, run: Path, msgs=MSGS) -> list[int]:
    """The prompt ids `lorakit eval` feeds this run's adapter for `msgs`."""
    return render.prompt_ids(evaluate.tokenizers_of(cfg, {"x": run / "adapter"})["x"], msgs)


def serve(base: Path, runs: dict, **kw):
    opts = server.ServeOptions(
        model=str(base), served_model_name="base", adapters={n: str(r) for n, (_, r) in runs.items()}, **kw
    )
    app, serving = server.build(opts)
    client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=TestClient(app), max_retries=0)
    return client, serving


def forcing(serving, token: int):
    """A hook making the model's every next token `token` (the head's output replaced): rows stop only where
    their own stop ids say."""

    def hook(module, inputs, out):
        forced = torch.zeros_like(out)
        forced[..., token] = 100.0
        return forced

    [head] = [m for n, m in serving.registry.net.named_modules() if n.endswith("lm_head")]
    return head.register_forward_hook(hook)


def test_one_batch_renders_and_stops_each_row_as_its_adapter_was_trained(runs, monkeypatch):
    base, trained = runs
    # A long window: the engine starts once all three requests are there, so they share one batch.
    _, serving = serve(base, trained, max_batch=3, batch_window_ms=60_000)
    submitted = {}
    real = serving.engine.submit
    monkeypatch.setattr(serving.engine, "submit", lambda job: submitted.setdefault(job.adapter, job) and real(job))
    tok = serving.registry.chat.tokenizer
    im_end, eos = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    async def together(**extra):
        reqs = [
            p.ChatCompletionRequest(model=n, messages=MSGS, max_tokens=4, temperature=0, **extra) for n in TEMPLATES
        ]
        return await asyncio.gather(*(serving.chat(r) for r in reqs))

    handle = forcing(serving, im_end)  # the chatml adapter's end of turn; the others end turns with EOS
    answers = dict(zip(TEMPLATES, asyncio.run(together())))
    handle.remove()
    assert serving.engine.batches == 1, "the three rows, of three templates, in one batch"
    for name in TEMPLATES:
        job = next(j for j in submitted.values() if j.adapter and j.adapter.startswith(f"{name}@"))
        assert job.prompt_ids == eval_prompt(*trained[name]), name
    assert len({tuple(j.prompt_ids) for j in submitted.values()}) == 3
    # usage counts the token that ends the answer, as OpenAI's API and vLLM do.
    got = {n: (a.choices[0].finish_reason, a.usage.completion_tokens) for n, a in answers.items()}
    assert got == {"chatml": ("stop", 1), "llama2": ("length", 4), "alpaca": ("length", 4)}
    handle = forcing(serving, eos)  # EOS ends every adapter's answer
    again = asyncio.run(together())
    # ignore_eos (vLLM's): no end-of-turn or EOS id ends an answer; it runs to max_tokens, the EOS text skipped.
    ignoring = asyncio.run(together(ignore_eos=True))
    handle.remove()
    assert [(a.choices[0].finish_reason, a.usage.completion_tokens) for a in again] == [("stop", 1)] * 3
    assert [(a.choices[0].finish_reason, a.usage.completion_tokens) for a in ignoring] == [("length", 4)] * 3
    assert [a.choices[0].message.content for a in ignoring] == [""] * 3
    serving.close()


def test_a_base_without_template_answers_chats_through_an_adapter_trained_with_llama2(runs):
    base, trained = runs
    client, serving = serve(base, {"l2": trained["llama2"]})
    r = client.chat.completions.create(model="l2", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    cfg, run = trained["llama2"]
    ids = eval_prompt(cfg, run)
    text = serving.registry.chat.tokenizer.decode(ids)
    assert text == "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nthe quick brown fox [/INST]"
    assert r.usage.prompt_tokens == len(ids)
    with pytest.raises(BadRequestError, match=r"base has no chat template .* /v1/completions"):
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=3)
    assert client.completions.create(model="base", prompt="the quick", max_tokens=2).choices[0].text is not None
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models["l2"]["chat_template"] == "llama2" and models["base"].get("chat_template") is None
    serving.close()


def test_a_reload_that_brings_a_new_template_serves_the_new_version_with_it(runs, tmp_path):
    base, trained = runs
    folder = tmp_path / "adapters"
    shutil.copytree(trained["chatml"][1] / "adapter", folder / "x")
    opts = server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(folder))
    app, serving = server.build(opts)
    http = TestClient(app)
    assert http.get("/v1/lorakit/state").json()["chat_templates"] == {"base": None, "x": "chatml"}
    req = p.ChatCompletionRequest(model="x", messages=MSGS, max_tokens=2, temperature=0)
    [job] = serving.chat_jobs(req)
    job.release()
    assert job.prompt_ids == eval_prompt(*trained["chatml"])
    shutil.copytree(trained["alpaca"][1] / "adapter", folder / ".x.new")
    shutil.rmtree(folder / "x")
    (folder / ".x.new").rename(folder / "x")
    assert serving.registry.scan(folder) == ["x"]
    assert http.get("/v1/lorakit/state").json()["chat_templates"] == {"base": None, "x": "alpaca"}
    [job] = serving.chat_jobs(req)
    job.release()
    assert job.prompt_ids == eval_prompt(*trained["alpaca"]) != eval_prompt(*trained["chatml"])
    serving.close()


def test_vllm_export_warns_of_an_adapter_whose_template_is_not_the_bases(runs, tmp_path, capsys):
    base, trained = runs
    adapter = trained["llama2"][1] / "adapter"
    [why] = vllm.template_warnings(str(base), {"l2": adapter})
    assert why.startswith("l2 was trained with the chat template llama2 (the base model has none): vLLM renders")
    bare = tmp_path / "bare"  # an adapter saved without its tokenizer answers in the base's template
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / f, bare / f)
    assert vllm.template_warnings(str(base), {"bare": bare}) == []


def test_eval_renders_each_adapter_with_its_own_template(runs):
    _, trained = runs
    cfg = trained["chatml"][0]
    toks = evaluate.tokenizers_of(cfg, {n: r / "adapter" for n, (_, r) in trained.items()})
    texts = {n: toks[n].decode(render.prompt_ids(toks[n], MSGS)) for n in TEMPLATES}
    assert texts["llama2"].startswith("<s>[INST] <<SYS>>") and texts["alpaca"].endswith("### Response:\n")
    assert texts["chatml"].endswith("<|im_start|>assistant\n")
    # The base has no template of its own: eval gives it the run's data.chat_template, as training did.
    assert toks[evaluate.BASE].chat_template == render.FALLBACK_TEMPLATES["chatml"]
