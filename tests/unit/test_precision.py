"""train.precision: auto on each GPU generation, with the device's compute capability mocked: bf16 only where the
GPU has it natively (8.0+), fp16 below (T4, V100), where torch.cuda.is_bf16_supported() still says True (emulated
bf16). Training, accelerate and `lorakit plan`'s matmul probe take the one answer of model.pick_dtype."""

import re
from pathlib import Path

import pytest
import torch

from lorakit import config, plan, train
from lorakit import model as lkmodel

# (GPU, compute capability, what auto trains in)
GENERATIONS = [
    ("V100", (7, 0), torch.float16),
    ("T4", (7, 5), torch.float16),
    ("A100", (8, 0), torch.bfloat16),
    ("L4", (8, 9), torch.bfloat16),
    ("H100", (9, 0), torch.bfloat16),
]


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of the compute capability the test sets; bf16 'supported' everywhere, as torch says with
    emulation. Returns the devices get_device_capability was asked about."""
    asked = []

    def set_capability(capability: tuple[int, int]) -> list:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        return asked

    return set_capability


@pytest.mark.parametrize("name, capability, want", GENERATIONS)
def test_auto_is_bf16_only_where_the_gpu_has_it_natively(gpu, name, capability, want):
    asked = gpu(capability)
    assert lkmodel.pick_dtype("auto", "cuda") == want
    assert lkmodel.pick_dtype("auto", "cuda:1") == want and asked[-1] == torch.device("cuda:1")  # that GPU's own
    assert lkmodel.pick_dtype("auto", "cpu") == torch.float32
    assert lkmodel.pick_dtype("bf16", "cuda") == torch.bfloat16  # asked for, as given
    assert lkmodel.pick_dtype("fp16", "cuda") == torch.float16


class Built(Exception):
    """Raised by the stand-in Accelerator once it has recorded what training asked of it."""


@pytest.mark.parametrize("name, capability, want", GENERATIONS)
def test_training_gives_accelerate_that_precision(gpu, monkeypatch, tiny_llama_dir, name, capability, want):
    gpu(capability)
    monkeypatch.setattr(train, "use_device", lambda device: "cuda")
    asked = {}

    def accelerator(**kwargs):
        asked.update(kwargs)
        raise Built

    monkeypatch.setattr(train, "Accelerator", accelerator)
    cfg = config.validate({"model": str(tiny_llama_dir), "data": {"train": "x.jsonl"}})
    with pytest.raises(Built):
        train.setup(cfg, resume=False, overwrite=False, force=False, device="cuda", started=0.0)
    assert asked["mixed_precision"] == {torch.float16: "fp16", torch.bfloat16: "bf16"}[want]


@pytest.mark.parametrize("name, capability, want", GENERATIONS)
def test_plan_measures_a_gpu_in_the_dtype_training_uses(gpu, monkeypatch, name, capability, want):
    gpu(capability)
    made = []

    def randn(*size, device=None, dtype=None, **kwargs):  # the probe's operands: recorded, never allocated
        made.append((device, dtype))
        raise Built

    monkeypatch.setattr(torch, "randn", randn)
    with pytest.raises(Built):
        plan.matmul_flops("cuda")
    assert made == [("cuda", want)]


def test_recipes_that_say_fp16_on_a_t4_train_in_fp16_there(gpu):
    recipes = Path(__file__).resolve().parents[2] / "configs" / "recipes"
    said = [p for p in sorted(recipes.glob("*.yaml")) if re.search(r"fp16 on a T4|T4: fp16", p.read_text())]
    assert len(said) >= 2, said  # gemma-2-2b-custom (QLoRA) and gemma-2b-guanaco (LoRA)
    for capability, want in [((7, 5), torch.float16), ((8, 6), torch.bfloat16)]:  # a T4, then an A10
        gpu(capability)
        for path in said:
            assert lkmodel.pick_dtype(config.load(path).train.precision, "cuda") == want, path.name
