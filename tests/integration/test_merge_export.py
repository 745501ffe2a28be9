"""merge (LoRA and QLoRA) with parity, GGUF round trip with Modelfile, and the vLLM command line."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import cli, export, merge
from lorakit import model as lkmodel
from lorakit.errors import LorakitError
from tiny import save_tiny


def make_adapter(base_dir: Path, out: Path, r: int = 8, quantized: bool = False) -> Path:
    torch.manual_seed(0)
    base = lkmodel.load_model(str(base_dir), quantization="4bit" if quantized else None)
    # Random B: a fresh LoRA is a no-op, and parity against a no-op proves nothing.
    net = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False))
    net.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


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
    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
        with reference.disable_adapter():
            base_logits = reference(input_ids=ids).logits
        assert not torch.allclose(merged(input_ids=ids).logits, base_logits, atol=1e-2), "the adapter changed the model"
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template and merged.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_bf16_merge_is_bf16_within_tolerance(tmp_path, bases):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    report = merge.merge(adapter, tmp_path / "merged", dtype="bf16")
    assert report["ok"] and report["dtype"] == "bf16"
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_qlora_merge_uses_dequantized_base(tmp_path, bases):
    pytest.importorskip("bitsandbytes")
    adapter = make_adapter(bases["llama"], tmp_path / "adapter", quantized=True)
    report = merge.merge(adapter, tmp_path / "merged", base=str(bases["llama"]), dtype="fp32", qlora=True)
    assert report["ok"] and report["top1_agreement"] > 0.9
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("4bit" in type(m).__name__ for m in merged.modules()), "saved as plain weights, not 4-bit"


def test_refusals(tmp_path, bases, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    with pytest.raises(LorakitError, match="was trained on .* not on"):
        merge.merge(adapter, tmp_path / "m1", base=str(bases["qwen2"]))
    (tmp_path / "exists").mkdir()
    assert cli.main(["merge", str(adapter), str(tmp_path / "exists")]) == 2
    assert "output folder" in capsys.readouterr().err
    # --force merges anyway (shapes differ here, so peft itself refuses: still one clear path, exit 2 or 0).
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = "renamed/copy"
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(LorakitError, match="renamed/copy"):
        merge.merge(adapter, tmp_path / "m2", base=str(bases["llama"]))
    assert merge.merge(adapter, tmp_path / "m3", base=str(bases["llama"]), force=True, dtype="fp32")["ok"]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_round_trip_and_modelfile(tmp_path, bases, outtype):
    result = export.export_gguf(bases["llama"], tmp_path / "out", outtype=outtype)
    assert result["max_abs_logit_diff"] <= result["tolerance"]
    if outtype == "f32":
        assert result["max_abs_logit_diff"] < 1e-4
    gguf_path = Path(result["gguf"])
    back = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert back.config.num_hidden_layers == 2
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{gguf_path.name}\n")
    assert "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert not list((tmp_path / "out").glob(".*.tmp")), "no temp file left"


def test_gguf_refuses_unsupported_architectures(tmp_path, bases):
    with pytest.raises(LorakitError, match="supports llama models, not 'qwen2'"):
        export.export_gguf(bases["qwen2"], tmp_path / "out")


def test_vllm_command_and_rank_check(tmp_path, bases, capsys):
    a = make_adapter(bases["llama"], tmp_path / "a", r=8)
    b = make_adapter(bases["llama"], tmp_path / "b", r=16)
    cmd = export.vllm_command(str(bases["llama"]), {"a": a, "b": b})
    assert cmd.startswith(f"vllm serve {Path(bases['llama']).resolve()} --enable-lora --lora-modules ")
    assert f"a={a.resolve()}" in cmd and f"b={b.resolve()}" in cmd and "--max-lora-rank 16" in cmd
    odd = make_adapter(bases["llama"], tmp_path / "odd", r=4)
    args = ["export", str(bases["llama"]), "--format", "vllm", "--adapter", f"odd={odd}"]
    assert cli.main(args) == 2
    assert "rank 4 is not one vLLM accepts" in capsys.readouterr().err
    assert cli.main(["export", str(bases["llama"]), "--format", "vllm", "--adapter", f"a={a}"]) == 0
    assert "--lora-modules a=" in capsys.readouterr().out
