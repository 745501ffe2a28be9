"""Training on tiny local models: every method learns, outputs reload with plain peft, resume is exact."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import cli, config, loss, packing, train
from lorakit.errors import LorakitError
from tiny import save_tiny

WORDS = ["red", "green", "blue", "cat", "dog", "fish", "one", "two", "three", "sun", "moon", "star"]


def task_file(path: Path, n: int = 64) -> Path:
    """A learnable toy task: repeat the words of the prompt in reverse order."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.choices(WORDS, k=4)
            f.write(
                json.dumps({"prompt": "reverse: " + " ".join(words), "completion": " ".join(reversed(words))}) + "\n"
            )
    return path


def make_config(tmp_path: Path, model_dir: Path, **over) -> config.RunConfig:
    raw = {
        "model": str(model_dir),
        "method": "lora",
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "train": str(task_file(tmp_path / "task.jsonl")),
            "eval": 0.125,
            "max_length": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "seed": 0, "scheduler": "constant"},
    }
    for key, value in over.items():
        config.apply_override(raw, f"{key}={json.dumps(value)}")
    return config.validate(raw)


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {a: save_tiny(tmp_path_factory.mktemp(a), arch=a) for a in ("llama", "qwen2", "gemma3", "bloom")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "bloom"])
def test_lora_lowers_the_loss_and_reloads_with_plain_peft(tmp_path, arch_dirs, arch):
    cfg = make_config(tmp_path, arch_dirs[arch])
    result = train.run(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 12
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], (records[0]["loss"], records[-1]["loss"])
    s = result.summary
    assert s["steps"] == 12 and s["final_eval_loss"] is not None and 0 < s["trainable_params"] < s["total_params"]
    assert s["packing"] is (arch != "bloom")
    for name in (
        "loss.png",
        "summary.json",
        "config.yaml",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer_config.json",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    assert config.load(tmp_path / "run" / "config.yaml") == cfg

    # Plain peft, no lorakit: same logits as the model in memory.
    base = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "bloom"])
def test_full_fine_tuning_saves_a_model_folder(tmp_path, arch_dirs, arch):
    cfg = make_config(tmp_path, arch_dirs[arch], method="full", **{"train.lr": 3e-3})
    result = train.run(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert result.summary["trainable_params"] == result.summary["total_params"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    assert saved.config.model_type == AutoModelForCausalLM.from_pretrained(arch_dirs[arch]).config.model_type
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "bloom"])
def test_qlora_trains_on_cpu(tmp_path, arch_dirs, arch):
    pytest.importorskip("bitsandbytes")
    cfg = make_config(tmp_path, arch_dirs[arch], method="qlora")
    result = train.run(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    base = result.model.get_base_model()
    assert any("4bit" in type(m).__name__ for m in base.modules()), "the base is really 4-bit"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_grad_accum_gives_the_same_gradients_as_one_big_batch(tmp_path, arch_dirs):
    from accelerate import Accelerator

    cfg = make_config(tmp_path, arch_dirs["llama"], **{"adapter.dropout": 0.0})
    tok = train.model.load_tokenizer(cfg.model)
    prepared = train.data.prepare(cfg.data, tok)
    examples = train._examples(prepared.train)
    rows = packing.unpacked(8)  # eight rows of different lengths: micro-batches differ in token counts
    grads = []
    for batch_size in (8, 2):
        torch.manual_seed(0)
        net = train.build_model(cfg, torch.float32, "cpu")
        micro = [
            packing.collate([[examples[i] for i in rows[r]] for r in range(j, j + batch_size)], tok.pad_token_id)
            for j in range(0, 8, batch_size)
        ]
        train.accumulate(loss.OnTrainedTokens(net), micro, Accelerator(cpu=True), tok.pad_token_id)
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def run_cli(args, env=None):
    exe = Path(sys.executable).parent / "lorakit"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    )


def test_killed_run_resumes_to_identical_weights(tmp_path, arch_dirs):
    def write(name, out):
        cfg = make_config(
            tmp_path,
            arch_dirs["llama"],
            output_dir=str(tmp_path / out),
            **{
                "adapter.dropout": 0.1,
                "train.save_every": 3,
                "train.max_steps": 10,
                "train.scheduler": "cosine",
                "train.warmup_steps": 2,
            },
        )
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    whole, killed = write("whole.yaml", "whole"), write("killed.yaml", "killed")
    assert run_cli(["train", str(whole), "--no-progress"]).returncode == 0
    died = run_cli(["train", str(killed), "--no-progress"], env={"LORAKIT_KILL_AFTER_STEP": "7"})
    assert died.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()
    assert [p.name for p in sorted((tmp_path / "killed" / "checkpoints").iterdir())] == ["step-0000003", "step-0000006"]
    again = run_cli(["train", str(killed)])
    assert "already holds a run" in again.stderr and again.returncode == 2
    resumed = run_cli(["train", str(killed), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)), "resumed metrics continue without duplicates"
    ckpts = sorted((tmp_path / "killed" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-0000009", "step-0000010"], "the last step too; the newest 2 stay"
    # Each checkpoint holds its adapter in peft's format: usable without lorakit.
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(arch_dirs["llama"]), ckpts[-1] / "adapter")
    saved = load_file(ckpts[-1] / "trainable.safetensors")
    lora_a = next(k for k in saved if "lora_A" in k)
    assert torch.equal(dict(net.named_parameters())[lora_a], saved[lora_a])


def test_tensorboard_tracker_writes_offline(tmp_path, arch_dirs):
    pytest.importorskip("tensorboard")
    cfg = make_config(tmp_path, arch_dirs["llama"], track=["tensorboard"], **{"train.max_steps": 3})
    train.run(cfg, progress=False)
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_output_dir_of_another_run_is_not_overwritten(tmp_path, arch_dirs):
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 2})
    train.run(cfg, progress=False)
    other = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"r": 4})})
    with pytest.raises(LorakitError, match="already holds a run"):
        train.run(other, progress=False)
    with pytest.raises(LorakitError, match=r"different config \(adapter.r differ"):
        train.run(other, resume=True, progress=False)
    train.run(other, overwrite=True, progress=False)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_overwrite_only_deletes_lorakit_runs(tmp_path, arch_dirs, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    cfg = make_config(tmp_path, arch_dirs["llama"], output_dir=str(mine), **{"train.max_steps": 1})
    with pytest.raises(LorakitError, match=r"has no config.yaml, so lorakit did not write it"):
        train.run(cfg, overwrite=True, progress=False)
    with pytest.raises(LorakitError, match="holds this run's data"):
        train.run(cfg.model_copy(update={"output_dir": str(tmp_path)}), overwrite=True, progress=False)
    monkeypatch.chdir(mine)
    with pytest.raises(LorakitError, match="is the working folder"):
        train.run(cfg.model_copy(update={"output_dir": "."}), overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "my notes" and (tmp_path / "task.jsonl").is_file()


def test_a_full_disk_is_one_message_and_leaves_nothing_half_written(tmp_path, arch_dirs):
    """A real write failure (a file size limit: EFBIG, as a full disk gives ENOSPC) in a real run."""
    import resource

    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 2, "train.save_every": 1})
    train.run(cfg, progress=False)  # tokenizes into the cache, so the limited run fails while saving
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    exe = Path(sys.executable).parent / "lorakit"
    done = subprocess.run(
        [str(exe), "train", str(path), "--overwrite", "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=small_files,
    )
    assert done.returncode == 2, done.stderr
    messages = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not write" in done.stderr and "File too large" in done.stderr, done.stderr
    leftovers = [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_one_target_module_as_a_string(tmp_path, arch_dirs):
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"adapter.target_modules": "q_proj", "train.max_steps": 1})
    train.run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj"]


def write_yaml(tmp_path, cfg_dict):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return path


def test_bad_inputs_exit_2_with_one_message(tmp_path, arch_dirs, capsys, monkeypatch):
    good = make_config(tmp_path, arch_dirs["llama"]).model_dump(mode="json")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (
            {"train": {**good["train"], "batch_size": 0}},
            "train.batch_size: must be a whole number from 1 to 4096, or auto (got 0)",
        ),
        ({"train": {**good["train"], "lr": 5}}, "train.lr: Input should be less than 1"),
        ({"adapter": {**good["adapter"], "r": 0}}, "adapter.r: Input should be greater than or equal to 1"),
        ({"model": str(tmp_path / "no-such-model")}, "no-such-model"),
        (
            {"adapter": {**good["adapter"], "target_modules": ["q_proj", "qkv"]}},
            "adapter.target_modules: ['qkv'] match no module",
        ),
        ({"output_dir": str(tmp_path / "a_file" / "run")}, "cannot write there"),
    ]
    for change, fragment in cases:
        assert cli.main(["train", str(write_yaml(tmp_path, {**good, **change})), "--no-progress"]) == 2, fragment
        err = capsys.readouterr().err
        # Progress bars may come first on stderr; the message comes last, once.
        assert err.count("error: ") == 1 and "Traceback" not in err, err
        message = err[err.index("error: ") :]
        assert fragment in message, err
    # The target-module error lists the names that do exist.
    cli.main(["train", str(write_yaml(tmp_path, {**good, **cases[4][0]})), "--no-progress"])
    assert "q_proj" in capsys.readouterr().err.split("linear modules are:")[1]


def test_qlora_without_bitsandbytes(tmp_path, arch_dirs, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name.startswith("bitsandbytes") else object()
    )
    cfg = make_config(tmp_path, arch_dirs["llama"], method="qlora")
    with pytest.raises(LorakitError, match="pip install bitsandbytes"):
        train.run(cfg, progress=False)


def test_disk_full_while_saving_leaves_nothing_half_written(tmp_path, arch_dirs, monkeypatch):
    import errno

    from peft import PeftModel as _PeftModel

    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 2})

    def full_disk(self, path, *a, **k):
        (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_PeftModel, "save_pretrained", full_disk)
    with pytest.raises(
        LorakitError, match=r"could not write .*adapter: No space left on device\. Nothing half-written"
    ):
        train.run(cfg, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".adapter")], "temp folder removed"


@pytest.mark.parametrize(
    "variant",
    [
        {"adapter.use_dora": True},
        {"adapter.use_rslora": True, "train.gradient_checkpointing": True},
        {"adapter.modules_to_save": ["lm_head"], "train.scheduler": "linear", "train.warmup_steps": 2},
    ],
    ids=["dora", "rslora+checkpointing", "modules_to_save"],
)
def test_lora_variants_train_and_save_their_config(tmp_path, arch_dirs, variant):
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 6, **variant})
    train.run(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == cfg.adapter.use_dora and saved["use_rslora"] == cfg.adapter.use_rslora
    assert (saved["modules_to_save"] or None) == cfg.adapter.modules_to_save


def test_resume_never_restarts_silently_and_a_finished_run_extends_exactly(tmp_path, arch_dirs, capsys):
    llama = arch_dirs["llama"]
    no_ckpt = make_config(tmp_path, llama, output_dir=str(tmp_path / "plain"), **{"train.max_steps": 2})
    train.run(no_ckpt, progress=False)
    before = {f: (tmp_path / "plain" / f).read_bytes() for f in ("metrics.jsonl", "adapter/adapter_model.safetensors")}
    with pytest.raises(LorakitError, match=r"no checkpoint to resume from \(it saves none: set train.save_every"):
        train.run(no_ckpt, resume=True, progress=False)
    assert before == {f: (tmp_path / "plain" / f).read_bytes() for f in before}, (
        "nothing of the finished run was replaced"
    )
    new = make_config(tmp_path, llama, output_dir=str(tmp_path / "new"))
    with pytest.raises(LorakitError, match=r"no run has trained there"):
        train.run(new, resume=True, progress=False)
    assert not (tmp_path / "new").exists(), "no empty folder left behind"

    # A finished run with checkpoints: raising max_steps continues from its last step, as one longer run would.
    over = {"train.save_every": 2, "adapter.dropout": 0.1}
    straight = train.run(
        make_config(tmp_path, llama, output_dir=str(tmp_path / "a"), **over, **{"train.max_steps": 6}), progress=False
    )
    train.run(
        make_config(tmp_path, llama, output_dir=str(tmp_path / "b"), **over, **{"train.max_steps": 4}), progress=False
    )
    assert (tmp_path / "b" / "checkpoints" / "step-0000004").is_dir(), "the last step is checkpointed"
    capsys.readouterr()
    extended = train.run(
        make_config(tmp_path, llama, output_dir=str(tmp_path / "b"), **over, **{"train.max_steps": 6}),
        resume=True,
        progress=False,
    )
    assert "(step 4)" in capsys.readouterr().out
    for (name, p), q in zip(straight.model.named_parameters(), extended.model.parameters()):
        assert torch.equal(p, q), name


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_continue(tmp_path, arch_dirs, capsys, monkeypatch):
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.save_every": 2, "train.max_steps": 6})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # A shell starts a background job with SIGINT ignored (`make test &`): Python keeps that, and Ctrl-C would
    # never arrive. This test is about what a terminal's Ctrl-C does, so it gets Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Before the first checkpoint: save_every is set, the run just did not get there.
        monkeypatch.setenv("LORAKIT_INTERRUPT_AFTER_STEP", "1")  # a real SIGINT, as Ctrl-C sends
        assert cli.main(["train", str(path), "--no-progress", "train.log_every=1"]) == 130
        err = capsys.readouterr().err
        assert f"no checkpoint was saved in {tmp_path / 'run'} (the first comes at step 2)" in err
        assert cli.main(["train", str(path), "--no-progress", "train.log_every=1", "--resume"]) == 2
        assert "has no checkpoint to resume from (the first comes at step 2)" in capsys.readouterr().err
        monkeypatch.setenv("LORAKIT_INTERRUPT_AFTER_STEP", "3")
        assert cli.main(["train", str(path), "--no-progress", "train.log_every=1", "--overwrite"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert f"the newest checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-0000002'}" in err
    assert f"lorakit train {path} train.log_every=1 --no-progress --resume" in err, "the same command, with --resume"
    monkeypatch.delenv("LORAKIT_INTERRUPT_AFTER_STEP")
    assert cli.main(["train", str(path), "--no-progress", "train.log_every=1", "--resume"]) == 0


def test_the_summary_says_what_the_last_step_logged_with_evaluation_at_the_last_step(tmp_path, arch_dirs):
    """Evaluation runs at the last step: its time is not training time, and the loop's wall time includes it."""
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 3})
    summary = train.run(cfg, progress=False).summary
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 3 and "eval_loss" in last
    assert summary["tokens_per_s"] == round(last["tokens_per_s"], 1) and summary["train_s"] == last["train_s"]
    assert summary["eval_s"] > 0 and summary["wall_time_s"] >= last["train_s"] + summary["eval_s"] - 0.01
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_a_resume_that_fails_leaves_the_run_s_config_as_it_was(tmp_path, arch_dirs):
    """Here the data has gained a bad row: the resume fails in setup, after the run folder's checks passed."""
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 2, "train.save_every": 2})
    train.run(cfg, progress=False)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with open(cfg.data.train, "a") as f:
        f.write('{"prompt": "reverse: red"}\n')
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})})
    with pytest.raises(LorakitError, match="missing field 'completion'"):
        train.run(longer, resume=True, progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved, "the run still holds 2 steps"


def test_the_logged_rate_is_the_one_the_step_used_and_a_batch_over_the_data_is_said(tmp_path, arch_dirs, capsys):
    cfg = make_config(
        tmp_path, arch_dirs["llama"], **{"train.max_steps": 1, "train.scheduler": "cosine", "train.batch_size": 64}
    )
    train.run(cfg, progress=False)
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["lr"] == cfg.train.lr, "a one-step cosine run logged 0.0, the rate after its only step"
    assert "note: one step takes 64 rows" in capsys.readouterr().out


def test_a_run_plan_predicts_too_big_is_refused_before_anything_and_auto_picks_the_batch(
    tmp_path, arch_dirs, monkeypatch, capsys
):
    from lorakit import plan

    small = int(0.5 * 2**30)  # less than the framework alone: nothing fits this "machine"
    monkeypatch.setattr(plan, "this_device", lambda device, seconds=0.3: (small, 1e11))
    cfg = make_config(tmp_path, arch_dirs["llama"], **{"train.max_steps": 1})
    with pytest.raises(LorakitError, match=r"plan: peak ~.* GiB of 0.5 GiB per process .*does not fit .*--force"):
        train.run(cfg, progress=False)
    assert not (tmp_path / "run").exists(), "refused before the run folder was claimed"
    assert train.run(cfg, progress=False, force=True).summary["steps"] == 1, "--force trains anyway"

    shape, setup = plan.load_shape(cfg.model), plan.setup_of(cfg, "cpu")
    setup.batch = 8
    budget = sum(plan.memory(shape, setup).values())  # exactly what batch 8 needs: auto must pick 8
    monkeypatch.setattr(plan, "this_device", lambda device, seconds=0.3: (budget, 1e11))
    auto = make_config(tmp_path, arch_dirs["llama"], output_dir=str(tmp_path / "auto"),
                       **{"train.batch_size": "auto", "train.max_steps": 1})  # fmt: skip
    train.run(auto, progress=False)
    expected = 8
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]["batch_size"] == expected
    assert f"at batch {expected}" in capsys.readouterr().out
