"""`lorakit eval`: base + two adapters on one base copy, eval.json shape, eval.html, bad inputs."""

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorakit import cli, config, evaluate


def make_adapter(base_dir: Path, out: Path, r: int, targets: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    # init_lora_weights=False: random B, so each adapter really changes the outputs.
    net = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("eval")
    rows = [{"prompt": f"name {i} colors", "completion": "red green blue"} for i in range(6)]
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = make_adapter(tiny_llama_dir, tmp / "a", 4, ["q_proj", "v_proj"], 1)
    b = make_adapter(tiny_llama_dir, tmp / "b", 8, ["gate_proj", "up_proj", "down_proj"], 2)
    cfg = config.validate(
        {
            "model": str(tiny_llama_dir),
            "output_dir": str(tmp / "run"),
            "data": {"train": str(tmp / "eval.jsonl"), "eval": str(tmp / "eval.jsonl"), "cache_dir": str(tmp / "c")},
        }
    )
    return tmp, cfg, {"a": str(a), "b": str(b)}


def test_base_and_two_adapters_share_one_base(setup):
    _, cfg, adapters = setup
    net = evaluate.load_models(cfg, {n: Path(p) for n, p in adapters.items()}, force=False)
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(cfg.model).parameters())
    lora_params = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert lora_params > 0
    assert sum(p.numel() for p in net.parameters()) == base_params + lora_params, "one base copy, not one per adapter"
    assert set(net.peft_config) == {"a", "b"}


def test_eval_json_shape_metrics_and_html(setup):
    tmp, cfg, adapters = setup
    opts = evaluate.EvalOptions(adapters=adapters, output=str(tmp / "out"), max_new_tokens=6, batch_size=4)
    report = evaluate.run(cfg, opts)
    saved = json.loads((tmp / "out" / "eval.json").read_text())
    assert saved["models"].keys() == {"base", "a", "b"}
    for scores in saved["models"].values():
        for key in ("loss", "perplexity", "exact_match", "contains", "token_f1", "rouge_l", "bleu", "chrf"):
            assert key in scores
        assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-6)
    assert len(saved["examples"]) == 6 and saved["examples"][0]["reference"] == "red green blue"
    # The adapters have random B weights: their answers and losses differ from the base's.
    assert saved["models"]["a"]["loss"] != saved["models"]["base"]["loss"]
    assert any(ex["outputs"]["a"] != ex["outputs"]["base"] for ex in saved["examples"])
    assert report == saved

    class Examples(HTMLParser):
        ids: ClassVar[list] = []

        def handle_starttag(self, tag, attrs):
            d = dict(attrs)
            if "data-example" in d:
                self.ids.append(int(d["data-example"]))

    parser = Examples()
    parser.ids = []
    parser.feed((tmp / "out" / "eval.html").read_text())
    assert sorted(parser.ids) == list(range(6)), "every example appears exactly once"


def test_generation_only_without_references(setup, capsys):
    tmp, cfg, adapters = setup
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    opts = evaluate.EvalOptions(
        adapters=adapters, data=str(tmp / "prompts.jsonl"), output=str(tmp / "gen"), max_new_tokens=4
    )
    report = evaluate.run(cfg, opts)
    assert "metrics skipped" in report["note"]
    assert all("exact_match" not in m for m in report["models"].values())
    assert all(len(ex["outputs"]) == 3 and ex["reference"] is None for ex in report["examples"])


def test_the_base_alone_before_any_training(setup, tmp_path):
    """No adapter yet (the run has not trained): the base model is evaluated on its own."""
    _, cfg, _ = setup
    report = evaluate.run(cfg, evaluate.EvalOptions(output=str(tmp_path / "out"), max_new_tokens=4))
    assert list(report["models"]) == ["base"] and "loss" in report["models"]["base"]
    assert all(list(ex["outputs"]) == ["base"] for ex in report["examples"])


def test_bad_inputs(setup, tmp_path, capsys):
    _, cfg, adapters = setup
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((Path(adapters["a"]) / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = "someone/else"
    (other / "adapter_config.json").write_text(json.dumps(meta))
    (other / "adapter_model.safetensors").write_bytes((Path(adapters["a"]) / "adapter_model.safetensors").read_bytes())
    misfit = tmp_path / "misfit"  # the same names, other shapes: an adapter of another model
    misfit.mkdir()
    (misfit / "adapter_config.json").write_text(json.dumps(meta))
    weights = load_file(Path(adapters["a"]) / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros(v.shape[0], v.shape[1] + 8) for k, v in weights.items()}, misfit / "adapter_model.safetensors"
    )
    base_args = ["eval", str(cfg_path), "--max-new-tokens", "2"]
    cases = [
        (["--adapter", f"x={other}", "--output", str(tmp_path / "o1")], "was trained on 'someone/else'"),
        (
            ["--adapter", f"a={adapters['a']}", "--metric", "accuracyy", "--output", str(tmp_path / "o2")],
            "--metric 'accuracyy' does not exist",
        ),
        (["--adapter", "nameonly"], "is not NAME=PATH"),
        (["--adapter", f"a={tmp_path}"], "no adapter_config.json"),
        (["--adapter", f"base={adapters['a']}"], "an adapter named 'base': that name is the base model's in eval"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["--limit", "0"], "--limit 0: must be at least 1"),
        (["--adapter", f"x={misfit}", "--force"], "the adapter does not fit this base model (size mismatch for"),
    ]
    for extra, fragment in cases:
        assert cli.main(base_args + extra) == 2, fragment
        err = capsys.readouterr().err
        assert "error: " in err and fragment in err and "Traceback" not in err, err
    assert cli.main(base_args + ["--adapter", f"x={other}", "--force", "--output", str(tmp_path / "o3")]) == 0
    assert cli.main(base_args + ["--adapter", f"x={other}", "--force", "--output", str(tmp_path / "o3")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces an eval folder, never a folder of the user's own
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(base_args + ["--output", str(mine), "--overwrite"]) == 2
    assert "has no eval.json, so lorakit did not write it" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert cli.main(base_args + ["--output", str(tmp_path / "o3"), "--overwrite"]) == 0
    # A run folder named "base": its adapter would be evaluated as the base.
    shutil.copytree(adapters["a"], tmp_path / "runs" / "base" / "adapter")
    named_base = cfg_path.with_name("base.yaml")
    named_base.write_text(
        yaml.safe_dump({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "runs" / "base")})
    )
    assert cli.main(["eval", str(named_base), "--max-new-tokens", "2"]) == 2
    assert f"name it otherwise with --adapter NAME={tmp_path / 'runs' / 'base' / 'adapter'}" in capsys.readouterr().err


def test_harness_scores_each_model_on_the_shared_base(setup, tmp_path, capsys):
    """lm-evaluation-harness on a local task, each model's score checked against the same computation by hand."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lorakit[harness]')")
    from transformers import AutoTokenizer

    _, cfg, adapters = setup
    docs = [{"question": f"item {i} is", "answer": [" red", " green blue", " one two three"][i % 3]} for i in range(6)]
    (tmp_path / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "ll.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "lk_ll",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tmp_path / "ll.jsonl")}},
                "test_split": "test",
                "output_type": "loglikelihood",
                "doc_to_text": "{{question}}",
                "doc_to_target": "{{answer}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
            }
        )
    )
    opts = evaluate.EvalOptions(
        adapters=adapters, output=str(tmp_path / "out"), max_new_tokens=2, harness=str(tmp_path / "ll.yaml")
    )
    report = evaluate.run(cfg, opts)

    # By hand: exp(-mean over docs of the answer's summed log-probability after the question).
    tok = AutoTokenizer.from_pretrained(cfg.model)
    net = evaluate.load_models(cfg, {n: Path(p) for n, p in adapters.items()}, force=False)

    def perplexity(name: str) -> float:
        total = 0.0
        with evaluate.active(net, name), torch.no_grad():
            for d in docs:
                ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
                whole = tok(d["question"] + d["answer"], add_special_tokens=False)["input_ids"]
                logp = net(input_ids=torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
                total += sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        return math.exp(-total / len(docs))

    expected = {name: perplexity(name) for name in ("base", "a", "b")}
    assert len({round(v, 3) for v in expected.values()}) == 3, "each adapter changes the score: switching is tested"
    got = {name: report["models"][name]["harness"]["lk_ll"]["perplexity,none"] for name in expected}
    assert got == pytest.approx(expected, rel=1e-4)
    assert "<th>lk_ll:perplexity</th>" in (tmp_path / "out" / "eval.html").read_text()
    evaluate.print_table(report)
    assert "lk_ll:perplexity" in capsys.readouterr().out


def test_quickstart_compare_is_eval_with_sql_exact_match(tmp_path, tiny_llama_dir, capsys):
    """`quickstart compare` scores base and the run's adapter through `lorakit eval` (one evaluation path)."""
    from transformers import AutoTokenizer

    from lorakit.quickstart import make_task
    from lorakit.scoring import normalize_sql

    _, eval_path = make_task(tmp_path / "data", n_train=8, n_eval=4, seed=1)
    run = tmp_path / "runs" / "sql"
    make_adapter(tiny_llama_dir, run / "adapter", 4, ["q_proj", "v_proj"], 3)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run / "adapter")
    cfg_path = tmp_path / "quickstart.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama_dir),
                "output_dir": str(run),
                "data": {"train": str(eval_path), "eval": str(eval_path), "cache_dir": str(tmp_path / "c")},
            }
        )
    )
    assert cli.main(["quickstart", "compare", str(cfg_path), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["models"]) == ["base", "sql"] and report["settings"]["normalize"] == ["sql"]
    for name in ("base", "sql"):
        by_hand = sum(normalize_sql(ex["outputs"][name]) == normalize_sql(ex["reference"]) for ex in report["examples"])
        assert report["models"][name]["exact_match"] == by_hand / 4
        assert f"({by_hand}/4)" in out
    assert "held-out questions: 4" in out and f"[1] {report['examples'][0]['prompt'][-1]['content']}" in out
    assert cli.main(["quickstart", "compare", str(cfg_path), "--max-new-tokens", "6"]) == 0, "a rerun replaces it"
    capsys.readouterr()
    assert (
        cli.main(["quickstart", "compare", str(tmp_path / "quickstart.yaml"), "output_dir=" + str(tmp_path / "none")])
        == 2
    )
    assert "no adapter yet" in capsys.readouterr().err


def test_a_qlora_run_is_evaluated_on_the_4bit_base_it_was_trained_on(setup, tmp_path):
    """Its answers are the ones the adapter was trained against; --base-precision full evaluates the fp32 base."""
    from peft import PeftModel

    from lorakit import model, render

    _, cfg, _ = setup
    torch.manual_seed(0)
    quantized = model.load_model(cfg.model, quantization="4bit")
    net = get_peft_model(
        quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    net.save_pretrained(tmp_path / "q")
    qlora = cfg.model_copy(update={"method": "qlora"})
    losses = {}
    for precision in ("auto", "full"):
        opts = evaluate.EvalOptions(
            adapters={"q": str(tmp_path / "q")},
            output=str(tmp_path / precision),
            max_new_tokens=2,
            metrics=["exact_match"],
            base_precision=precision,
        )
        losses[precision] = evaluate.run(qlora, opts)["models"]["q"]["loss"]
    # The same loss by hand, on each base.
    tok = model.load_tokenizer(cfg.model)
    examples = evaluate.data.held_out(cfg.data).examples
    encoded = [render.encode(tok, ex, max_length=cfg.data.max_length) for ex in examples]
    for precision, quant in (("auto", "4bit"), ("full", None)):
        by_hand = PeftModel.from_pretrained(model.load_model(cfg.model, quantization=quant), tmp_path / "q").eval()
        assert losses[precision] == pytest.approx(evaluate.held_out_loss(by_hand, encoded, tok, 8), rel=1e-5)
    assert losses["auto"] != pytest.approx(losses["full"], rel=1e-4), "the two bases answer differently"


def test_a_full_fine_tune_is_compared_with_its_base(setup, tmp_path):
    _, cfg, _ = setup
    tuned = AutoModelForCausalLM.from_pretrained(cfg.model)
    with torch.no_grad():
        tuned.lm_head.weight.mul_(3.0)  # a model that answers differently
    tuned.save_pretrained(tmp_path / "full" / "model")
    full = cfg.model_copy(update={"method": "full", "output_dir": str(tmp_path / "full")})
    report = evaluate.run(full, evaluate.EvalOptions(max_new_tokens=4, metrics=["exact_match"]))
    assert list(report["models"]) == ["base", "full"]
    assert report["models"]["full"]["loss"] != pytest.approx(report["models"]["base"]["loss"])
    assert report["settings"]["adapters"] == {"full": str(tmp_path / "full" / "model")}


def test_an_adapter_named_with_dots_is_evaluated(setup, tmp_path):
    """A run folder like runs/llama-3.2-finetome names its adapter with dots, which peft refuses in module names."""
    _, cfg, adapters = setup
    report = evaluate.run(cfg, evaluate.EvalOptions(adapters={"llama-3.2-a": adapters["a"]}, output=str(tmp_path / "o"),
                                                    max_new_tokens=4, metrics=["exact_match"]))  # fmt: skip
    assert list(report["models"]) == ["base", "llama-3.2-a"]
    assert report["models"]["llama-3.2-a"]["loss"] != pytest.approx(report["models"]["base"]["loss"])
