"""run_folder: one lookup of "the adapter or model in this folder"; adapter.py: one reader of adapter configs, one
base rule."""

import json
from pathlib import Path

import pytest
from peft import LoraConfig

from lorakit import cli
from lorakit.adapter import check_base, read_adapter
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder, adapter_source, locate


def adapter(folder: Path, base: str = "some/base") -> Path:
    LoraConfig(r=8, target_modules=["q_proj"], base_model_name_or_path=base).save_pretrained(folder)
    return folder


def run_folder(root: Path, weights: str) -> RunFolder:
    run = RunFolder(root)
    root.mkdir(parents=True)
    run.config.write_text("model: x\n")
    if weights == "adapter":
        adapter(run.adapter)
    else:
        run.model.mkdir()
        (run.model / "config.json").write_text("{}")
    return run


def test_locate_finds_what_each_kind_of_folder_holds(tmp_path):
    lora = run_folder(tmp_path / "runs" / "sql", "adapter")
    full = run_folder(tmp_path / "runs" / "full", "model")
    bare = adapter(tmp_path / "mine")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")

    found = locate(lora.root)
    assert (found.kind, found.path, found.run, found.name) == ("adapter", lora.adapter, lora, "sql")
    assert locate(lora.adapter) == found, "a run's adapter/ given directly still belongs to its run"
    assert (locate(full.root).kind, locate(full.root).path, locate(full.root).name) == ("model", full.model, "full")
    assert (locate(bare).kind, locate(bare).run, locate(bare).name) == ("adapter", None, "mine")
    assert (locate(tmp_path / "plain").kind, locate(tmp_path / "plain").run) == ("model", None)
    assert locate(tmp_path) is None and locate(tmp_path / "missing") is None


def test_adapter_source_says_why_there_is_no_adapter(tmp_path):
    full = run_folder(tmp_path / "full", "model")
    with pytest.raises(LorakitError, match="is a full fine-tune"):
        adapter_source(full.root)
    with pytest.raises(LorakitError, match=r"no adapter_config.json there"):
        adapter_source(tmp_path)


def test_read_adapter_is_peft_config_and_a_broken_one_is_one_message(tmp_path):
    meta = read_adapter(adapter(tmp_path / "a", base="org/base"))
    assert (meta.peft_type, meta.r, meta.target_modules, meta.base_model_name_or_path) == (
        "LORA",
        8,
        {"q_proj"},
        "org/base",
    )
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match=r"a/adapter_config.json: not a peft adapter config"):
        read_adapter(tmp_path / "a")


def test_one_base_rule_names_paths_and_force(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tiny_llama_dir.parent)
    relative = read_adapter(adapter(tmp_path / "rel", base=tiny_llama_dir.name))
    check_base(relative, str(tiny_llama_dir), force=False, where="x")  # the same folder, named two ways
    check_base(read_adapter(adapter(tmp_path / "none", base=None)), "any/base", force=False, where="x")
    other = read_adapter(adapter(tmp_path / "other", base="someone/else"))
    with pytest.raises(LorakitError, match=r"x was trained on 'someone/else', not on the base .*--force"):
        check_base(other, str(tiny_llama_dir), force=False, where="x")
    check_base(other, str(tiny_llama_dir), force=True, where="x")


def test_eval_and_merge_accept_the_same_adapter(tmp_path, monkeypatch, tiny_llama_dir, capsys):
    """eval compared names as strings while merge resolved paths: an adapter whose base is recorded as a
    relative path was refused by eval and accepted by merge."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tiny_llama_dir.parent)
    net = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"])
    )
    net.save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = tiny_llama_dir.name  # as peft records a base loaded from a relative path
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(meta))
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": str(tiny_llama_dir),
                "output_dir": str(tmp_path / "run"),
                "data": {"train": str(rows), "eval": str(rows), "cache_dir": str(tmp_path / "c")},
            }
        )
    )
    assert (
        cli.main(
            [
                "eval",
                str(cfg),
                "--adapter",
                f"a={tmp_path / 'adapter'}",
                "--max-new-tokens",
                "2",
                "--metric",
                "exact_match",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (
        cli.main(
            [
                "merge",
                str(tmp_path / "adapter"),
                str(tmp_path / "merged"),
                "--base",
                str(tiny_llama_dir),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    ), capsys.readouterr().err


def interrupted_run(root: Path, base: Path, *, checkpoint: bool) -> RunFolder:
    """A run killed before its end: config.yaml, metrics and (maybe) a checkpoint, but no adapter/ yet."""
    from lorakit import config

    run = RunFolder(root)
    cfg = config.validate({"model": str(base), "output_dir": str(root), "data": {"train": "x.jsonl"}})
    config.dump(cfg, run.config)
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n')
    if checkpoint:
        for step in (2, 4):
            folder = run.checkpoints / f"step-{step:07d}"
            adapter(folder / "adapter", base=str(base))
            (folder / "state.json").write_text(json.dumps({"step": step}))
    return run


def test_a_run_without_its_adapter_says_how_to_use_or_finish_it(tmp_path, tiny_llama_dir, capsys):
    """Export called it "not a model folder … a Hugging Face id" and merge "give a run folder of lorakit train"."""
    run = interrupted_run(tmp_path / "runs" / "sql run", tiny_llama_dir, checkpoint=True)
    newest = run.checkpoints / "step-0000004"
    resume = f"lorakit train '{run.config}' --resume"
    commands = {
        "merge": ["merge", str(run.root), str(tmp_path / "merged")],
        "export gguf": ["export", str(run.root), str(tmp_path / "out"), "--format", "gguf", "--no-check"],
        "export vllm": ["export", str(run.root), "--format", "vllm"],
        "serve --adapter": [
            "serve",
            "--model",
            str(tiny_llama_dir),
            "--adapter",
            f"sql={run.root}",
            "--engine",
            "vllm",
        ],
    }
    for what, argv in commands.items():
        assert cli.main(argv) == 2, what
        err = capsys.readouterr().err
        assert f"{run.root} is a run of `lorakit train` that did not finish: it has no adapter/ yet" in err, (what, err)
        assert f"give its newest checkpoint '{newest}' instead" in err and f"finish the run: {resume}" in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out").exists()
    # The checkpoint it names is taken as it is, and belongs to its run: its config says the base and method.
    found = locate(newest)
    assert (found.kind, found.path, found.run, found.run_config().model) == (
        "adapter",
        newest / "adapter",
        run,
        str(tiny_llama_dir),
    )
    assert locate(newest / "adapter").run == run

    lost = interrupted_run(tmp_path / "lost", tiny_llama_dir, checkpoint=False)
    with pytest.raises(
        LorakitError, match=r"saved no checkpoint to resume from. Train it again: lorakit train \S+ --overwrite"
    ):
        adapter_source(lost.root)
