"""`lorakit plan`: the memory breakdown follows its formulas, on shapes small enough to count by hand."""

import json

import pytest

from lorakit import cli, plan
from lorakit.errors import LorakitError

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True,
}  # fmt: skip


def shape() -> plan.Shape:
    return plan.shape_of(TINY)


def test_shape_counts_a_llama_by_hand():
    s = shape()
    # q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    assert s.layer_params == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert s.params == 2 * (s.layer_params + 2 * 64) + 1000 * 64 + 64  # tied head: no second vocab matrix


def test_weights_by_method_and_lora_parameters():
    s = shape()
    lora = plan.memory(s, plan.Setup(method="lora", device="cuda", r=8))
    assert lora["weights"] == 2 * s.params  # bf16 on a GPU
    trained = 2 * 8 * sum(i + o for i, o in s.linears.values())  # r (in + out) per linear, 2 layers
    assert lora["trained_params"] == 4 * trained and lora["optimizer_states"] == 8 * trained
    q = plan.memory(s, plan.Setup(method="qlora", device="cuda"))
    linear = 2 * s.layer_params
    assert q["weights"] == int(linear * (0.5 + 1 / 64)) + 4 * (s.params - linear)
    full = plan.memory(s, plan.Setup(method="full", device="cpu"))
    assert full["weights"] == full["gradients"] == 4 * s.params and full["optimizer_states"] == 8 * s.params
    eight_bit = plan.memory(s, plan.Setup(method="full", device="cpu", optimizer="adamw_8bit"))
    assert eight_bit["optimizer_states"] == 2 * s.params


def test_checkpointing_keeps_one_input_per_layer_and_fsdp_shards():
    s = shape()
    big = plan.Setup(method="full", device="cuda", seq_len=2048, batch=8)
    off, on = plan.memory(s, big), plan.memory(s, plan.Setup(**{**big.__dict__, "checkpointing": True}))
    assert on["activations"] < off["activations"] and on["activations"] >= 2 * 8 * 2048 * 64 * 2
    sharded = plan.memory(s, plan.Setup(**{**big.__dict__, "nproc": 4, "strategy": "fsdp"}))
    assert sharded["weights"] == off["weights"] // 4 and sharded["optimizer_states"] == off["optimizer_states"] // 4
    assert plan.memory(s, plan.Setup(**{**big.__dict__, "trained_share": 1.0}))["logits"] == 2 * off["logits"]


def test_fits_and_the_largest_batch_agree_with_the_memory():
    s = shape()
    setup = plan.Setup(method="lora", device="cpu", seq_len=1024, batch=4)
    budget = sum(plan.memory(s, plan.Setup(**{**setup.__dict__, "batch": 16})).values())
    est = plan.estimate(s, setup, (budget, 1e11))
    here = est.fits["this CPU"]
    assert here["fits"] and here["largest_batch"] == 16 and est.tokens_per_s == here["tokens_per_s"] > 0
    assert not plan.estimate(s, plan.Setup(**{**setup.__dict__, "batch": 32}), (budget, 1e11)).fits["this CPU"]["fits"]


def test_bundled_references_and_unknown_layouts():
    assert "meta-llama/Llama-2-7b-hf" in plan.references() and "bigscience/bloom-1b1" in plan.references()
    seven = plan.load_shape("meta-llama/Llama-2-7b-hf")
    assert 6.7e9 < seven.params < 6.8e9, "Llama-2 7B has 6.74B parameters"
    assert 1.0e9 < plan.load_shape("bigscience/bloom-1b1").params < 1.1e9
    assert plan.load_shape("unsloth/Llama-3.2-1B-Instruct").params == plan.load_shape(
        "meta-llama/Llama-3.2-1B-Instruct").params  # fmt: skip
    with pytest.raises(LorakitError, match="not a layout plan knows"):
        plan.shape_of({"model_type": "gpt2", "n_embd": 64})


def test_the_json_and_the_table(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    args = ["plan", "--model", str(tmp_path / "config.json"), "--method", "qlora", "--device", "cuda", "--batch", "2"]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"device", "peak_bytes", "breakdown", "tokens_per_s", "fits"} <= out.keys()
    assert out["peak_bytes"] == sum(out["breakdown"].values()) and "T4 16GB" in out["fits"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "qlora r 16, micro-batch 2 x 1024 tokens" in table and "H100 80GB" in table and "peak" in table
    assert cli.main(["plan"]) == 2 and "give a run config" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_every_bundled_reference_gets_a_breakdown_and_a_fits_table(method, capsys):
    for ref in plan.references():
        assert cli.main(["plan", "--model", ref, "--method", method, "--device", "cuda", "--seq-len", "512",
                         "--batch", "1", "--gradient-checkpointing", "--json"]) == 0  # fmt: skip
        out = json.loads(capsys.readouterr().out)
        assert out["peak_bytes"] == sum(out["breakdown"].values()), ref
        assert set(plan.GPUS) == set(out["fits"]), ref
        assert all(out["breakdown"][k] > 0 for k in ("weights", "gradients", "optimizer_states", "activations")), ref
    # The published orders of magnitude: a 7B QLoRA fits a 16 GB T4 and a 16-bit LoRA an A100, while its full
    # fine-tuning (16 bytes a parameter before activations) fits no single GPU here.
    seven = plan.load_shape("meta-llama/Llama-2-7b-hf")
    small = plan.Setup(method=method, device="cuda", seq_len=512, batch=1, checkpointing=True)
    fits = plan.estimate(seven, small).fits
    assert fits["A100 40GB"]["fits"] == fits["H100 80GB"]["fits"] == (method != "full")
    assert fits["T4 16GB"]["fits"] or method != "qlora"


@pytest.mark.parametrize(
    ("method", "checkpointing", "batch", "levers"),
    [
        ("lora", False, 4, ["train.batch_size", "turn on train.gradient_checkpointing", "use method qlora"]),
        ("qlora", True, 4, ["train.batch_size"]),  # it told a QLoRA run with checkpointing to use both
        ("full", True, 1, ["use method qlora"]),
    ],
)
def test_advice_for_a_run_that_does_not_fit_names_only_what_it_does_not_use(
    tmp_path, monkeypatch, method, checkpointing, batch, levers
):
    from lorakit import config

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    cfg = config.validate({
        "model": str(tmp_path / "config.json"), "method": method, "data": {"train": "x.jsonl"},
        "train": {"gradient_checkpointing": checkpointing, "batch_size": batch},
    })  # fmt: skip
    monkeypatch.setattr(plan, "this_device", lambda device, seconds: (1 << 20, 1e11))  # 1 MiB: nothing fits
    with pytest.raises(LorakitError, match="does not fit this cpu") as e:
        plan.check_run(cfg, "cpu", 1)
    advice = str(e.value).split("does not fit this cpu. ")[1]
    every = ["train.batch_size", "turn on train.gradient_checkpointing", "use method qlora"]
    assert [lever for lever in every if lever in advice] == levers, advice
    assert "data.max_length" in advice and "--force" in advice
