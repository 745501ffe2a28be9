"""train.kernels: liger's kernels where they can run (auto), required (liger), or never (none).

liger-kernel runs on CUDA only and is not installed here: a stand-in module records the call lorakit makes, its
apply functions taking the switches and defaults of liger-kernel 0.8.5's (liger_kernel/transformers/monkey_patch.py).
tests/integration/test_gpu.py checks the real kernels' losses on a GPU.
"""

import importlib.machinery
import inspect
import sys
import types

import pytest
import torch
import yaml

from lorakit import adapter, cli, config, kernels
from lorakit.errors import LorakitError
from tiny import tiny_model, tiny_tokenizer

# liger-kernel 0.8.5's switches (and their defaults) for some of the architectures it has kernels for.
SWIGLU = {"rope": True, "cross_entropy": False, "fused_linear_cross_entropy": True, "rms_norm": True, "swiglu": True}
GEGLU = {"rope": True, "cross_entropy": False, "fused_linear_cross_entropy": True, "rms_norm": True, "geglu": True}
LIGER_0_8_5 = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "smollm3", "olmo2"], SWIGLU),
    **dict.fromkeys(["gemma", "gemma2", "gemma3_text"], GEGLU),
    "gemma3": {**GEGLU, "layer_norm": True},  # the multimodal checkpoints (4B and up): their vision tower's norms
    "glm4": {**SWIGLU, "rope": False},  # liger has no RoPE kernel for GLM-4 (rope=True raises there)
    "granite": {**SWIGLU, "cross_entropy": True, "fused_linear_cross_entropy": False},
    "llava": {"cross_entropy": False, "fused_linear_cross_entropy": True},  # its loss only: nothing lorakit uses
}


def liger_modules(monkeypatch, monkey_patch: types.ModuleType) -> None:
    """liger_kernel as installed (find_spec finds it), with `monkey_patch` as its transformers.monkey_patch."""
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    transformers = types.ModuleType("liger_kernel.transformers")
    package.transformers, transformers.monkey_patch = transformers, monkey_patch
    for name, module in [("liger_kernel", package), ("liger_kernel.transformers", transformers),
                         ("liger_kernel.transformers.monkey_patch", monkey_patch)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


def recording(model_type: str, defaults: dict[str, bool], calls: list):
    """An apply_liger_kernel_to_* stand-in with liger's signature: it records its keyword arguments."""

    def patch(**kw):
        calls.append((model_type, kw))

    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()]
    patch.__signature__ = inspect.Signature([*params, inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY,
                                                                        default=None)])  # fmt: skip
    return patch


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel as installed: its apply functions record their keyword arguments."""
    calls = []
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {m: recording(m, d, calls) for m, d in LIGER_0_8_5.items()}
    liger_modules(monkeypatch, monkey_patch)
    return calls


@pytest.fixture
def broken_liger(monkeypatch):
    """liger_kernel installed, but importing its kernels raises (as with a triton built for another torch)."""
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")

    def fail(name):
        raise RuntimeError("Triton: CUDA driver version is insufficient\n(more lines)")

    monkey_patch.__getattr__ = fail
    liger_modules(monkeypatch, monkey_patch)


@pytest.fixture
def no_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # find_spec finds nothing, import fails: not installed


def llama():
    return tiny_model("llama", tiny_tokenizer())


def test_auto_on_the_cpu_applies_nothing_and_says_nothing(fake_liger, capsys):
    net = llama()
    assert kernels.apply(net, "auto", "cpu") == [] and kernels.applied(net) == []
    assert fake_liger == [] and capsys.readouterr().out == ""


def test_auto_on_cuda_patches_the_model_and_leaves_the_loss_to_lorakit(fake_liger, capsys):
    net = llama()
    # torch.device("cuda") is only a name: nothing runs on it here.
    assert kernels.apply(net, "auto", torch.device("cuda")) == ["rms_norm", "rope", "swiglu"]
    expected = {"model": net, "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                "fused_linear_cross_entropy": False}  # fmt: skip
    assert fake_liger == [("llama", expected)] and capsys.readouterr().out == ""
    # The record survives peft's wrapping: the run's summary reads it from the PeftModel.
    cfg = config.validate({"model": "m", "data": {"train": "x.jsonl"}})
    assert kernels.applied(adapter.attach(net, cfg)) == ["rms_norm", "rope", "swiglu"]


def test_auto_on_cuda_without_liger_says_so_in_one_line(no_liger, capsys):
    assert kernels.apply(llama(), "auto", "cuda") == []
    assert capsys.readouterr().out == (
        "note: train.kernels: auto applies no fused kernels: liger-kernel is not installed: pip install "
        "'lorakit[gpu]'\n"
    )


def test_a_liger_that_fails_to_import_is_a_message_not_a_crash(broken_liger, capsys):
    assert kernels.apply(llama(), "auto", "cuda") == []
    out = capsys.readouterr().out
    assert out.startswith(
        "note: train.kernels: auto applies no fused kernels: liger-kernel is installed but does "
        "not import (RuntimeError: Triton: CUDA driver version is insufficient); reinstall it"
    )
    assert out.count("\n") == 1
    with pytest.raises(LorakitError, match=r"^train.kernels: liger cannot apply here: liger-kernel is installed but"):
        kernels.apply(llama(), "liger", "cuda")


def test_none_never_applies(fake_liger, capsys):
    assert kernels.apply(llama(), "none", "cuda") == [] and fake_liger == [] and capsys.readouterr().out == ""


@pytest.mark.parametrize("model_type", sorted(LIGER_0_8_5))
def test_every_architecture_of_the_installed_liger_gets_its_default_kernels(fake_liger, model_type):
    table = sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN
    assert kernels.installed_liger(on_cuda=True) == table
    # liger's defaults for that architecture, its loss left out: GLM-4 without RoPE, Gemma's GeGLU, LLaVA nothing.
    want = sorted(k for k, on in LIGER_0_8_5[model_type].items() if on and k not in kernels.LOSSES)
    chosen, why = kernels.choose("auto", model_type, True, table)
    assert chosen == want and (why is None) == bool(want)
    if not want:
        return
    assert kernels.choose("liger", model_type, True, table) == (want, None)
    net = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))
    assert kernels.apply(net, "auto", "cuda") == want
    (called, kw), = fake_liger  # fmt: skip
    losses_off = {k: False for k in kernels.LOSSES if k in LIGER_0_8_5[model_type]}
    assert called == model_type and kw == {"model": net, **dict.fromkeys(want, True), **losses_off}


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "mixtral", "smollm3"])
def test_architectures_beyond_llama_mistral_qwen2_and_gemma(fake_liger, model_type):
    net = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))
    assert kernels.apply(net, "auto", "cuda") == ["rms_norm", "rope", "swiglu"] and fake_liger[0][0] == model_type


def test_an_architecture_liger_has_no_kernels_for_says_so_under_auto(fake_liger, capsys):
    bloom = tiny_model("bloom", tiny_tokenizer())
    assert kernels.apply(bloom, "auto", "cuda") == [] and fake_liger == []
    out = capsys.readouterr().out
    assert out.startswith(
        "note: train.kernels: auto applies no fused kernels: the installed liger-kernel has no "
        "kernels for 'bloom' models (it has them for: gemma, gemma2, gemma3, gemma3_text, glm4, "
    )
    assert "llava" not in out and out.endswith("a newer one may: pip install -U liger-kernel\n")
    with pytest.raises(LorakitError, match="no kernels for 'bloom' models"):
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
