"""Every stage on the GPU: eval, generate, merge and the QLoRA eval base, on CUDA. Skipped without one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import cli, config, evaluate, kernels, loss, merge, model, packing, train
from lorakit.generate import generate
from lorakit.run_folder import find_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
]


@pytest.fixture
def run(tmp_path, tiny_llama_dir):
    torch.manual_seed(0)
    net = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    net.save_pretrained(tmp_path / "run" / "adapter")
    rows = tmp_path / "eval.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"name {i} colors", "completion": "red green"}) + "\n" for i in range(6))
    )
    return config.validate({
        "model": str(tiny_llama_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(rows), "eval": str(rows), "cache_dir": str(tmp_path / "c")},
    })  # fmt: skip


def test_auto_is_the_gpu_in_bf16():
    assert model.pick_device("auto") == "cuda" and model.pick_dtype("auto", "cuda") in (torch.bfloat16, torch.float16)


def test_eval_and_generate_run_on_cuda(run):
    net = evaluate.load_models(
        run, {"run": find_adapter(run.output_dir)}, force=False, device="cuda", dtype=torch.bfloat16
    )
    assert next(net.parameters()).device.type == "cuda"
    tok = model.load_tokenizer(run.model)
    answers = generate(net, tok, [[{"role": "user", "content": "hi"}]] * 3, max_new_tokens=4, batch_size=2)
    assert len(answers) == 3
    report = evaluate.run(run, evaluate.EvalOptions(max_new_tokens=4, metrics=["exact_match"]))
    assert set(report["models"]) == {"base", "run"} and report["models"]["run"]["loss"] > 0


def test_merge_runs_and_checks_parity_on_cuda(run, tmp_path):
    report = merge.merge(tmp_path / "run", tmp_path / "merged", dtype="bf16", device="cuda")
    assert report["ok"] and report["top1_agreement"] > 0.9


def test_qlora_eval_uses_the_4bit_base_on_cuda(run, tmp_path, monkeypatch):
    qlora = tmp_path / "qlora.yaml"
    qlora.write_text(json.dumps({**run.model_dump(mode="json"), "method": "qlora"}))
    seen, real = {}, model.load_model
    monkeypatch.setattr(model, "load_model", lambda name, **kw: seen.update(kw) or real(name, **kw))
    assert cli.main(["eval", str(qlora), "--max-new-tokens", "2", "--output", str(tmp_path / "o")]) == 0
    assert seen["quantization"] == "4bit" and seen["device"] == "cuda"


# ---- issue 23: QLoRA's dtype policy and liger's kernels, on CUDA ----
def small_run(tmp_path, model_dir, method: str, **train_keys) -> config.RunConfig:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"name {i} colors", "completion": "red green blue"}) + "\n" for i in range(16))
    )
    return config.validate({
        "model": str(model_dir), "method": method, "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(rows), "cache_dir": str(tmp_path / "c"), "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "seed": 0, "scheduler": "constant", **train_keys},
    })  # fmt: skip


@pytest.fixture
def undo_liger(monkeypatch):
    """liger patches llama's RoPE (and the classes later llama norms and MLPs are built from) for the whole
    process: put them back after the test, or the CPU tests after it would run liger's CUDA-only RoPE."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_qlora_trains_bf16_lora_weights_on_cuda(tmp_path, tiny_llama_dir, optimizer):
    if model.pick_dtype("auto", "cuda") != torch.bfloat16:
        pytest.skip("this GPU has no bf16: QLoRA keeps fp32 LoRA weights under fp16 (adapter.qlora_dtype)")
    cfg = small_run(tmp_path, tiny_llama_dir, "qlora", optimizer=optimizer, gradient_checkpointing=True, kernels="none")
    result = train.run(cfg, progress=False)
    net = result.model
    lora = {p.dtype for n, p in net.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in net.named_parameters() if "lora_" not in n and p.dtype != torch.uint8}
    assert lora == {torch.bfloat16} and frozen == {torch.bfloat16}, (lora, frozen)
    assert next(p for p in net.parameters() if p.requires_grad).device.type == "cuda"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.summary["dtype"] == "bfloat16" and result.summary["kernels"] == []
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]


def test_qlora_under_fp16_keeps_fp32_lora_weights_for_the_loss_scaler(tmp_path, tiny_llama_dir):
    # Its own process: accelerate's state (mixed precision) is one per process, and the other runs here are bf16.
    path = tmp_path / "fp16.yaml"
    config.dump(small_run(tmp_path, tiny_llama_dir, "qlora", precision="fp16", kernels="none"), path)
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(path), "--no-progress"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    # accelerate's GradScaler refuses fp16 gradients ("Attempting to unscale FP16 gradients"): fp16 LoRA would fail.
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dtype"] == "float16"
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]


def loss_and_grads(cfg: config.RunConfig, kernels_choice: str, batch: dict) -> tuple[float, torch.Tensor, list[str]]:
    """One forward and backward of `cfg`'s model on CUDA in bf16: the loss per token, the LoRA B gradients
    (A's are zero at the start: B is), and the kernels applied."""
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"kernels": kernels_choice})})
    torch.manual_seed(0)
    net = train.build_model(cfg, torch.bfloat16, "cuda")
    net.train()  # checkpointing recomputes in training mode only; dropout is 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = loss.loss_sum(net, {k: v.to("cuda") for k, v in batch.items()})
    total.backward()
    grads = torch.cat([p.grad.float().flatten() for n, p in net.named_parameters() if "lora_B" in n])
    return total.item() / count, grads, kernels.applied(net)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_liger_kernels_keep_the_loss(tmp_path, tiny_llama_dir, method, undo_liger):
    # QLoRA as its recipe runs: with checkpointing, whose recompute goes through the patched modules again.
    cfg = small_run(tmp_path, tiny_llama_dir, method, gradient_checkpointing=method == "qlora")
    ids = torch.randint(3, 600, (6, 24), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [{"input_ids": row, "labels": row} for row in ids]
    # Two examples packed per row: restarting position ids, as packed training feeds RoPE.
    batch = packing.collate([examples[0:2], examples[2:4], examples[4:6]], pad_id=0)
    plain = loss_and_grads(cfg, "none", batch)  # first: liger's RoPE patch is process-wide
    fused = loss_and_grads(cfg, "liger", batch)
    assert plain[2] == [] and fused[2] == ["rms_norm", "rope", "swiglu"]
    assert fused[0] == pytest.approx(plain[0], rel=1e-2), (plain[0], fused[0])
    assert torch.nn.functional.cosine_similarity(fused[1], plain[1], dim=0) > 0.99


def test_auto_applies_liger_in_a_qlora_run(tmp_path, tiny_llama_dir, undo_liger):
    cfg = small_run(tmp_path, tiny_llama_dir, "qlora", optimizer="paged_adamw_8bit", gradient_checkpointing=True)
    result = train.run(cfg, progress=False)
    assert result.summary["kernels"] == ["rms_norm", "rope", "swiglu"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
