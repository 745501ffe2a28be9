"""train.kernels: liger's kernels where they can run (auto), required (liger), or never (none).

liger-kernel runs on CUDA only and is not installed here: a stand-in module records the call lorakit makes.
tests/integration/test_gpu.py checks the real kernels' losses on a GPU.
"""

import importlib.machinery
import sys
import types

import pytest
import torch
import yaml

from lorakit import adapter, cli, config, kernels
from lorakit.errors import LorakitError
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel as installed: its apply_liger_kernel_to_* functions record their keyword arguments."""
    calls = []
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    transformers = types.ModuleType("liger_kernel.transformers")
    for patch, _ in kernels.LIGER.values():
        setattr(transformers, patch, lambda patch=patch, **kw: calls.append((patch, kw)))
    package.transformers = transformers
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers)
    return calls


@pytest.fixture
def no_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # find_spec finds nothing, import fails: not installed


def llama():
    return tiny_model("llama", tiny_tokenizer())


def test_auto_on_the_cpu_applies_nothing(fake_liger):
    net = llama()
    assert kernels.apply(net, "auto", "cpu") == [] and kernels.applied(net) == []
    assert fake_liger == []


def test_auto_on_cuda_patches_the_model_and_leaves_the_loss_to_lorakit(fake_liger):
    net = llama()
    # torch.device("cuda") is only a name: nothing runs on it here.
    assert kernels.apply(net, "auto", torch.device("cuda")) == ["rms_norm", "rope", "swiglu"]
    expected = {"model": net, "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                "fused_linear_cross_entropy": False}  # fmt: skip
    assert fake_liger == [("apply_liger_kernel_to_llama", expected)]
    # The record survives peft's wrapping: the run's summary reads it from the PeftModel.
    cfg = config.validate({"model": "m", "data": {"train": "x.jsonl"}})
    assert kernels.applied(adapter.attach(net, cfg)) == ["rms_norm", "rope", "swiglu"]


def test_auto_without_liger_applies_nothing(no_liger):
    assert kernels.apply(llama(), "auto", "cuda") == []


def test_none_never_applies(fake_liger):
    assert kernels.apply(llama(), "none", "cuda") == [] and fake_liger == []


@pytest.mark.parametrize(
    "model_type, expected",
    [("llama", "swiglu"), ("mistral", "swiglu"), ("qwen2", "swiglu"), ("gemma", "geglu"), ("gemma2", "geglu"),
     ("gemma3_text", "geglu"), ("gemma3", "geglu")],
)  # fmt: skip
def test_supported_architectures(model_type, expected):
    assert kernels.choose("auto", model_type, on_cuda=True, installed=True) == ["rms_norm", "rope", expected]
    assert kernels.choose("liger", model_type, on_cuda=True, installed=True) == ["rms_norm", "rope", expected]


def test_bloom_under_auto_applies_nothing(fake_liger):
    bloom = tiny_model("bloom", tiny_tokenizer())
    assert kernels.choose("auto", "bloom", on_cuda=True, installed=True) == []
    assert kernels.apply(bloom, "auto", "cuda") == [] and fake_liger == []
    with pytest.raises(LorakitError, match="no kernels lorakit uses for 'bloom' models"):
        kernels.apply(bloom, "liger", "cuda")


def test_liger_without_cuda_is_one_clear_error(fake_liger):
    with pytest.raises(LorakitError, match=r"^train.kernels: liger cannot apply here: its kernels run on CUDA GPUs"):
        kernels.apply(llama(), "liger", "cpu")
    assert fake_liger == []


def test_liger_without_the_package_names_the_extra(no_liger):
    with pytest.raises(LorakitError, match=r"liger-kernel is not installed: pip install 'lorakit\[gpu\]'"):
        kernels.apply(llama(), "liger", "cuda")


def test_liger_where_it_cannot_apply_stops_the_run_with_exit_code_2(tmp_path, tiny_llama_dir, capsys, no_liger):
    # Not installed (checked first) on any machine; the device is the run's own, since accelerate's state is one
    # per process: a GPU machine's suite has trained on the GPU before.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi", "completion": "there"}\n' * 4)
    run = {
        "model": str(tiny_llama_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(rows), "cache_dir": str(tmp_path / "cache")}, "train": {"max_steps": 1},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert cli.main(["train", str(path), "train.kernels=liger", "--no-progress"]) == 2
    assert "train.kernels: liger cannot apply here: liger-kernel is not installed" in capsys.readouterr().err


def test_an_unknown_value_is_rejected_by_the_config():
    with pytest.raises(LorakitError, match=r"train.kernels: Input should be 'auto', 'liger' or 'none'"):
        config.validate({"data": {"train": "x.jsonl"}, "train": {"kernels": "fast"}})
    assert config.validate({"data": {"train": "x.jsonl"}}).train.kernels == "auto"
