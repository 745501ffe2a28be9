"""adapter.attach's dtype policy: no fp32 upcasts of the frozen base, QLoRA's trained weights in bf16 on a GPU.

bitsandbytes' 4-bit layers run on the CPU, so every dtype is checked here; a bf16 model on the CPU stands for
the GPU (the policy's device rule is called with "cuda" where the device decides).
"""

import pytest
import torch
from peft import prepare_model_for_kbit_training

from lorakit import adapter, config, loss, train
from lorakit import model as lkmodel

pytest.importorskip("bitsandbytes")


def run_config(model_dir, method: str, **train) -> config.RunConfig:
    return config.validate({
        "model": str(model_dir), "method": method, "data": {"train": "unused.jsonl"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0}, "train": train,
    })  # fmt: skip


def dtypes(net) -> dict[str, set[torch.dtype]]:
    """The dtypes of each group of parameters: embeddings, norms, lm_head, lora, 4bit (bitsandbytes' packed uint8)."""
    groups: dict[str, set[torch.dtype]] = {}
    for name, p in net.named_parameters():
        if "lora_" in name:
            group = "lora"
        elif p.dtype == torch.uint8:
            group = "4bit"
        elif "embed_tokens" in name:
            group = "embeddings"
        elif "norm" in name:
            group = "norms"
        elif "lm_head" in name:
            group = "lm_head"
        else:
            group = name  # anything else would show up in the assertions by name
        groups.setdefault(group, set()).add(p.dtype)
    return groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_keeps_the_base_dtype_and_fp32_adapters(tiny_llama_dir, dtype):
    net = adapter.attach(lkmodel.load_model(str(tiny_llama_dir), dtype=dtype), run_config(tiny_llama_dir, "lora"))
    base = {dtype}
    assert dtypes(net) == {
        "embeddings": base, "norms": base, "lm_head": base, "lora": {torch.float32},
        **{n: base for n, _ in net.named_parameters() if "proj.base_layer" in n},
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_keeps_the_frozen_weights_in_the_compute_dtype(tiny_llama_dir, dtype):
    base = lkmodel.load_model(str(tiny_llama_dir), dtype=dtype, quantization="4bit")
    net = adapter.attach(base, run_config(tiny_llama_dir, "qlora"))
    # On the CPU the LoRA weights are fp32 (the device rule below), whatever the base.
    assert dtypes(net) == {
        "embeddings": {dtype}, "norms": {dtype}, "lm_head": {dtype}, "4bit": {torch.uint8}, "lora": {torch.float32}
    }  # fmt: skip
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)


def test_qlora_trains_bf16_lora_weights_on_a_gpu(tiny_llama_dir):
    base = lkmodel.load_model(str(tiny_llama_dir), dtype=torch.bfloat16, quantization="4bit")
    net = adapter.attach(base, run_config(tiny_llama_dir, "qlora"))
    adapter.train_in(net, adapter.qlora_dtype(torch.bfloat16, "cuda"))  # what attach does on a GPU
    bf16 = {torch.bfloat16}
    assert dtypes(net) == {"embeddings": bf16, "norms": bf16, "lm_head": bf16, "4bit": {torch.uint8}, "lora": bf16}


@pytest.mark.parametrize(
    "compute, device, expected",
    [
        (torch.bfloat16, "cuda", torch.bfloat16),
        (torch.bfloat16, torch.device("cuda:1"), torch.bfloat16),
        (torch.float16, "cuda", torch.float32),  # accelerate's loss scaler cannot unscale fp16 gradients
        (torch.float32, "cuda", torch.float32),
        (torch.bfloat16, "cpu", torch.float32),
        (torch.float32, "cpu", torch.float32),
    ],
)
def test_qlora_dtype(compute, device, expected):
    assert adapter.qlora_dtype(compute, device) == expected


def lora_grads(model_dir, checkpointing: bool) -> dict[str, torch.Tensor]:
    base = lkmodel.load_model(str(model_dir), quantization="4bit")
    torch.manual_seed(0)
    net = adapter.attach(base, run_config(model_dir, "qlora", gradient_checkpointing=checkpointing))
    for hook in getattr(base, "_require_grads_hooks", []):  # transformers' input-gradient hook: not needed
        hook.remove()
    assert not checkpointing or base.is_activation_checkpointing
    ids = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(0))
    net.train()
    net(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


def test_non_reentrant_checkpointing_needs_no_input_gradients(tiny_llama_dir):
    plain, checkpointed = lora_grads(tiny_llama_dir, False), lora_grads(tiny_llama_dir, True)
    assert plain.keys() == checkpointed.keys()
    assert all(checkpointed[n] is not None and torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    assert any(g.abs().sum() > 0 for g in checkpointed.values())


def first_losses(model_dir, dtype: torch.dtype, old: bool, steps: int = 5) -> list[float]:
    """Losses of a few AdamW steps of QLoRA on one batch: `old` as lorakit did before (peft's kbit preparation:
    every weight that is not 4-bit upcast to fp32); else the policy, with the GPU's rule for a bf16 model."""
    base = lkmodel.load_model(str(model_dir), dtype=dtype, quantization="4bit")
    if old:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    net = adapter.attach(base, run_config(model_dir, "qlora"))
    if not old:
        adapter.train_in(net, adapter.qlora_dtype(dtype, "cuda"))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 600, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as accelerate's
            total, count = loss.loss_sum(net, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total.item() / count)
    return losses


def test_first_losses_match_the_old_kbit_path(tiny_llama_dir):
    # fp32 (the CPU's): exactly the old path, which upcast nothing there.
    assert first_losses(tiny_llama_dir, torch.float32, old=True) == first_losses(
        tiny_llama_dir, torch.float32, old=False
    )
    # bf16 frozen weights and bf16 LoRA weights against fp32 ones (measured: within 0.05% over 5 steps).
    old, new = first_losses(tiny_llama_dir, torch.bfloat16, True), first_losses(tiny_llama_dir, torch.bfloat16, False)
    assert new == pytest.approx(old, rel=1e-2), (old, new)
    assert new[-1] < 0.8 * new[0]


# ---- under fp16 (GPUs without bf16: T4, V100) every trained weight is an fp32 master ----
def fp16_run(model_dir, method: str, **adapter_keys) -> config.RunConfig:
    cfg = run_config(model_dir, method, kernels="none")
    return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update=adapter_keys)})


@pytest.mark.parametrize(
    "method, adapter_keys",
    [("lora", {"modules_to_save": ["lm_head"]}), ("lora", {"use_dora": True}),
     ("qlora", {"modules_to_save": ["lm_head"]}), ("full", {})],
)  # fmt: skip
def test_under_fp16_every_trained_weight_is_fp32(tiny_llama_dir, method, adapter_keys):
    net = train.build_model(fp16_run(tiny_llama_dir, method, **adapter_keys), torch.float16, "cpu")
    trained = {n: p.dtype for n, p in net.named_parameters() if p.requires_grad}
    assert set(trained.values()) == {torch.float32}, trained
    if "modules_to_save" in adapter_keys:
        assert any("modules_to_save" in n for n in trained)
    frozen = {p.dtype for p in net.parameters() if not p.requires_grad and p.dtype != torch.uint8}
    assert frozen <= {torch.float16}  # the frozen base stays in 16 bits (a full fine-tune has none)


@pytest.mark.parametrize("method, adapter_keys", [("lora", {"modules_to_save": ["lm_head"]}), ("full", {})])
def test_the_fp16_loss_scaler_steps_a_run_with_trained_modules(tiny_llama_dir, method, adapter_keys):
    # What accelerate does under fp16 on a GPU, on the CPU: fp16 autocast, a GradScaler that unscales the gradients
    # (refusing fp16 ones: "Attempting to unscale FP16 gradients") before clipping and stepping.
    cfg = fp16_run(tiny_llama_dir, method, **adapter_keys)
    net = train.build_model(cfg, torch.float16, "cpu")
    net.train()
    optimizer = train.build_optimizer(net, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad and "lora_A" not in n}
    ids = torch.randint(3, 600, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        total, count = loss.loss_sum(net, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    scaler.scale(total / count).backward()
    scaler.unscale_(optimizer)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**8  # no overflow: the step was taken
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters() if n in before)
