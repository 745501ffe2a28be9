"""dropout.Dropout16: LoRA's dropout sampled from 16-bit draws on the CPU, with nn.Dropout's rate and scaling."""

import pytest
import torch
from torch import nn

from lorakit import adapter, config, dropout
from lorakit import model as lkmodel

P = 0.05
CUT = round(P * 65536)  # 3277: the rate is 3277 / 65536


def test_mask_rate_is_uniform_over_every_16_bit_lane_and_uncorrelated():
    torch.manual_seed(0)
    mask = dropout.drop_mask((1000, 1000), CUT).flatten().float()
    rate = CUT / 65536
    sigma = (rate * (1 - rate) / mask.numel()) ** 0.5
    assert abs(mask.mean().item() - rate) < 5 * sigma
    # Each 64-bit draw gives 4 elements: a lane whose bits are not uniform (the draw's sign bit) shows here.
    for lane in range(4):
        assert abs(mask[lane::4].mean().item() - rate) < 5 * 2 * sigma
    # Neighbours, within a draw and across draws, are independent: their joint rate is the product.
    both = (mask[:-1] * mask[1:]).mean().item()
    assert abs(both - rate**2) < 5 * (rate**2 / mask.numel()) ** 0.5


def test_masks_follow_torch_seed_and_differ_between_calls():
    torch.manual_seed(7)
    a, b = dropout.drop_mask((64, 96), CUT), dropout.drop_mask((64, 96), CUT)
    torch.manual_seed(7)
    assert torch.equal(dropout.drop_mask((64, 96), CUT), a)
    assert not torch.equal(a, b)
    assert dropout.drop_mask((3, 5, 7), CUT).shape == (3, 5, 7)  # sizes that are not a multiple of 4


def test_forward_drops_and_rescales_like_nn_dropout_and_backward_uses_the_same_mask():
    torch.manual_seed(0)
    drop = dropout.Dropout16(P)
    x = torch.rand(400, 500) + 0.5  # no zeros: a zero in the output is a dropped element
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    scale = 1 / (1 - CUT / 65536)
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert abs((~kept).float().mean().item() - P) < 0.003
    assert abs(y.mean().item() - x.mean().item()) < 0.01  # the expected input is unchanged
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g * scale, 0.0))


def test_eval_mode_and_rate_zero_are_identity():
    x = torch.randn(8, 16)
    assert dropout.Dropout16(P).eval()(x) is x
    assert dropout.Dropout16(0.0)(x) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_torch_dropout():
    x = torch.ones(1000, 1000, device="cuda")
    y = dropout.Dropout16(P)(x)
    assert y.is_cuda and abs((y == 0).float().mean().item() - P) < 0.003


def run_config(model_dir, rate: float) -> config.RunConfig:
    return config.validate({
        "model": str(model_dir), "method": "lora", "data": {"train": "unused.jsonl"},
        "adapter": {"r": 4, "alpha": 8, "dropout": rate},
    })  # fmt: skip


def test_attach_swaps_every_lora_dropout_and_keeps_the_adapter(tiny_llama_dir):
    net = adapter.attach(lkmodel.load_model(str(tiny_llama_dir)), run_config(tiny_llama_dir, P))
    lora_layers = [m for m in net.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert len(lora_layers) == 7 * net.config.num_hidden_layers  # q k v o gate up down in every layer
    for layer in lora_layers:
        (drop,) = layer.lora_dropout.values()
        assert isinstance(drop, dropout.Dropout16) and drop.p == P
    assert all("dropout" not in n for n, _ in net.named_parameters())  # no weights added
    assert all("dropout" not in k for k in net.state_dict())
    net.eval()
    assert not any(m.training for m in net.modules() if isinstance(m, dropout.Dropout16))


def test_attach_without_dropout_keeps_peft_identity(tiny_llama_dir):
    net = adapter.attach(lkmodel.load_model(str(tiny_llama_dir)), run_config(tiny_llama_dir, 0.0))
    assert not any(isinstance(m, dropout.Dropout16) for m in net.modules())
