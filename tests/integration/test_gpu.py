"""Every stage on the GPU: eval, generate, merge and the QLoRA eval base, on CUDA. Skipped without one."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit import cli, config, evaluate, merge, model
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
