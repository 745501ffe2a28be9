"""`lorakit plan`: the memory breakdown follows its formulas, on shapes small enough to count by hand; the GPU
constants meet the runs they were fitted to; and plan answers as `lorakit train` does (its overrides, its auto
batch, its refusals)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorakit import cli, config, plan
from lorakit.errors import LorakitError

ROOT = Path(__file__).resolve().parents[2]

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
    linear, q_trained = 2 * s.layer_params, 2 * 16 * sum(i + o for i, o in s.linears.values())
    assert q["weights"] == int(linear * (0.5 + 1 / 64)) + 2 * (s.params - linear)  # the rest stays bf16
    # adapter.qlora_dtype: bf16 LoRA weights on a GPU, so bf16 gradients and AdamW moments
    assert q["trained_params"] == q["gradients"] == 2 * q_trained and q["optimizer_states"] == 4 * q_trained
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
    here = {"this CPU": plan.Device("cpu", budget, 1e11)}
    est = plan.estimate(s, setup, here)
    row = est.fits["this CPU"]
    assert row["fits"] and row["largest_batch"] == 16 and est.tokens_per_s == row["tokens_per_s"] > 0
    assert row["peak_bytes"] == est.peak_bytes and row["batch"] == est.batch == 4
    assert not plan.estimate(s, plan.Setup(**{**setup.__dict__, "batch": 32}), here).fits["this CPU"]["fits"]
    auto = plan.estimate(s, replace(setup, batch="auto"), here)
    assert auto.fits["this CPU"]["batch"] == auto.batch == 16 and auto.peak_bytes == budget


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


# ---- plan answers as `lorakit train` does ----
def run_file(tmp_path, **train_keys) -> Path:
    """A run config of the TINY model (its config.json only: plan reads nothing else)."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    body = {"model": str(tmp_path / "config.json"), "data": {"train": "x.jsonl", "max_length": 512},
            "train": {"batch_size": 4, **train_keys}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(body))  # JSON is YAML
    return tmp_path / "run.yaml"


def planned(capsys, *argv: str) -> dict:
    assert cli.main(["plan", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine: no GPU, and 16 GiB of RAM measured at 1e11 FLOP/s (no timing in a unit test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(plan, "this_device", lambda device, seconds: (16 * plan.GIB, 1e11))


def test_plan_takes_the_overrides_train_takes(tmp_path, capsys, no_gpu):
    run = run_file(tmp_path)
    out = planned(capsys, str(run), "train.batch_size=2", "--device", "cuda", "adapter.r=4", "data.max_length=256")
    assert (out["setup"]["batch"], out["setup"]["r"], out["setup"]["seq_len"]) == (2, 4, 256)
    # Each option is the override of its key: the same run, the same answer.
    assert planned(capsys, str(run), "--device", "cuda", "--batch", "2", "--r", "4", "--seq-len", "256") == out
    assert cli.main(["plan", str(run), "train.batch_sise=2"]) == 2
    assert "train.batch_sise: unknown key" in capsys.readouterr().err, "config.load's own message, as for train"
    local = tmp_path / "local.yaml"  # and --local, as train takes it
    local.write_text(run.read_text()[:-1] + ', "local": {"train": {"batch_size": 3}}}')
    assert planned(capsys, str(local), "--local", "--device", "cuda")["setup"]["batch"] == 3


def test_without_a_gpu_plan_lists_this_cpu_and_the_common_gpus(capsys, no_gpu):
    recipe = str(ROOT / "configs" / "recipes" / "llama-2-7b-guanaco-qlora.yaml")
    out = planned(capsys, recipe)  # --device auto, on this machine without a GPU
    assert list(out["fits"]) == ["this CPU", *plan.GPUS]
    assert {"T4 16GB", "L4 24GB", "A10 24GB", "RTX 4090 24GB", "A100 40GB", "A100 80GB", "H100 80GB",
            "H200 141GB"} <= set(plan.GPUS)  # fmt: skip
    assert out["fits"]["T4 16GB"]["fits"] and not out["fits"]["this CPU"]["fits"], "a 7B QLoRA: a T4, not 16 GiB fp32"
    cpu_peak, gpu_peak = out["fits"]["this CPU"]["peak_bytes"], out["fits"]["T4 16GB"]["peak_bytes"]
    assert out["device"] == "cpu" and out["peak_bytes"] == cpu_peak > gpu_peak, "the breakdown is this CPU's (fp32)"
    assert cli.main(["plan", recipe]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in out["fits"]) and "data.packing is off" in table
    assert list(planned(capsys, recipe, "--device", "cpu")["fits"]) == ["this CPU"]


@pytest.mark.parametrize(("device", "nproc"), [("cpu", 1), ("cpu", 2), ("cuda", 1)])
def test_batch_auto_is_the_batch_train_picks(tmp_path, capsys, monkeypatch, device, nproc):
    run = run_file(tmp_path, batch_size="auto")
    cfg = config.load(run)
    shape, setup = plan.load_shape(cfg.model), plan.setup_of(cfg, device)
    budget = sum(plan.memory(shape, replace(setup, batch=8)).values()) * nproc  # 8 rows a process fit exactly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(plan, "this_device", lambda device, seconds: (budget, 1e11))
    picked, line = plan.check_run(cfg, device, nproc)  # what train.setup calls
    this = "this GPU" if device == "cuda" else "this CPU"
    row = planned(capsys, str(run), "--device", device, "--nproc", str(nproc))["fits"][this]
    assert picked == row["batch"] == 8 and f"at batch {picked}" in line and row["fits"]
    assert cli.main(["plan", str(run), "--device", device, "--nproc", str(nproc)]) == 0
    assert "micro-batch auto (each device's largest that fits; the breakdown at 8)" in capsys.readouterr().out


def test_processes_on_a_cpu_share_its_ram_in_plan_as_in_train(tmp_path, capsys, monkeypatch):
    run = run_file(tmp_path)
    cfg = config.load(run)
    shape = plan.load_shape(cfg.model)
    budget = sum(plan.memory(shape, plan.setup_of(cfg, "cpu")).values())  # one process fits; four get a quarter each
    monkeypatch.setattr(plan, "this_device", lambda device, seconds: (budget, 1e11))
    assert plan.check_run(cfg, "cpu", 1)[0] == 4
    assert planned(capsys, str(run), "--device", "cpu")["fits"]["this CPU"]["fits"]
    with pytest.raises(LorakitError, match="does not fit this cpu"):
        plan.check_run(cfg, "cpu", 4)
    four = planned(capsys, str(run), "--device", "cpu", "--nproc", "4")["fits"]["this CPU"]
    assert not four["fits"] and four["memory_bytes"] == budget // 4
    one = planned(capsys, str(run), "--device", "cpu")["fits"]["this CPU"]
    assert four["tokens_per_s"] == one["tokens_per_s"], "processes sharing the cores add no speed"


def test_fsdp_is_refused_where_train_refuses_it(tmp_path, capsys, no_gpu):
    from lorakit import launch

    run = run_file(tmp_path, strategy="fsdp")
    with pytest.raises(LorakitError) as refused:
        launch.check_strategy(config.load(run), on_gpu=False)  # what `lorakit train --nproc 2` says on a CPU
    assert cli.main(["plan", str(run), "--nproc", "2", "--device", "cpu"]) == 2
    assert str(refused.value) in capsys.readouterr().err
    out = planned(capsys, str(run), "--nproc", "2")  # auto: this CPU refuses, the GPUs shard
    assert out["fits"]["this CPU"]["refused"] == str(refused.value) and not out["fits"]["this CPU"]["fits"]
    assert out["fits"]["H100 80GB"]["fits"] and out["notes"] == [f"this CPU: {refused.value}"]
    gpus = planned(capsys, str(run), "--nproc", "2", "--device", "cuda")  # the GPUs' breakdown: bf16, sharded
    assert gpus["breakdown"]["weights"] == 2 * plan.load_shape(str(tmp_path / "config.json")).params // 2
    assert planned(capsys, str(run), "--device", "cpu")["fits"]["this CPU"]["fits"], "one process: nothing to shard"
    with pytest.raises(LorakitError) as qlora:
        config.validate({"method": "qlora", "data": {"train": "x"}, "train": {"strategy": "fsdp"}})
    assert cli.main(["plan", str(run), "--method", "qlora", "--nproc", "2"]) == 2
    assert str(qlora.value).splitlines()[1][:60] in capsys.readouterr().err, "config's rule, as train validates it"


@pytest.mark.parametrize(
    ("gpu", "kind", "first", "precision"),
    [(False, "cpu", "this CPU", "fp32 on this CPU"), (True, "cuda", "this GPU", "bf16 on a GPU")],
)
def test_the_estimate_leads_with_the_device_train_would_use_here(
    tmp_path, capsys, monkeypatch, gpu, kind, first, precision
):
    """Issue 30: without a GPU, plan's breakdown and JSON top level were a GPU's (bf16), not this CPU's."""
    run = run_file(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(plan, "this_device", lambda device, seconds: (16 * plan.GIB, 1e11))
    out = planned(capsys, str(run))  # --device auto: what `lorakit train` picks (model.pick_device)
    assert list(out["fits"]) == [first, *plan.GPUS], "the other devices stay in the table"
    assert (out["device"], out["setup"]["device"]) == (kind, kind)
    assert out["peak_bytes"] == out["fits"][first]["peak_bytes"]
    assert out["tokens_per_s"] == out["fits"][first]["tokens_per_s"] and out["batch"] == out["fits"][first]["batch"]
    assert cli.main(["plan", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f"{precision}:")
    if not gpu:  # --device cuda still plans for the GPUs, on a machine without one
        cuda = planned(capsys, str(run), "--device", "cuda")
        assert cuda["device"] == "cuda" and cuda["peak_bytes"] == cuda["fits"]["T4 16GB"]["peak_bytes"]


def test_rows_past_the_context_and_processes_past_a_host_are_refused(tmp_path, capsys, no_gpu):
    """Issue 30: --seq-len 100000000 planned a model of a 2,048-token context, and --nproc 1000000 was taken."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "max_position_embeddings": 2048}))
    model = ["plan", "--model", str(tmp_path / "config.json")]
    assert cli.main([*model, "--seq-len", "100000000", "--batch", "4096"]) == 2
    err = capsys.readouterr().err
    assert "rows of 100,000,000 tokens" in err and "context is 2,048 tokens" in err and "--seq-len 2048" in err
    assert planned(capsys, *model[1:], "--seq-len", "2048")["setup"]["seq_len"] == 2048
    assert plan.load_shape("meta-llama/Llama-2-7b-hf").context == 4096, "the bundled configs carry their context"
    for command in (model, ["train", str(run_file(tmp_path))]):  # one range for both
        assert cli.main([*command, "--nproc", "1000000"]) == 2
        assert "--nproc 1000000: must be between 1 and 1024" in capsys.readouterr().err


def test_huge_numbers_keep_the_table_in_columns(tmp_path, capsys, no_gpu):
    """Issue 30: the columns ran together when a number outgrew their fixed widths."""
    import re

    (tmp_path / "config.json").write_text(json.dumps(TINY))  # no context to refuse the length at
    huge = ["--seq-len", "100000000", "--batch", "4096"]
    assert cli.main(["plan", "--model", str(tmp_path / "config.json"), *huge]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("device"))
    breakdown, devices = lines[1:start], [line for line in lines[start:] if not line.startswith("note:")]
    numbers = [re.search(r"(\d+\.\d\d) G", line) for line in breakdown]
    assert max(len(n.group(1)) for n in numbers) > 8, "wider than the table's fixed columns were"
    assert len({n.end(1) for n in numbers}) == 1, breakdown

    def ends(line: str) -> list[int]:  # where each cell after the device name ends: they are right-aligned
        return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)][1:]

    assert len(devices) == 1 + len(plan.GPUS) + 1 and all(ends(line) == ends(devices[0]) for line in devices), devices


# ---- the GPU constants against the runs they were fitted to ----
# The reference H200 (../shared/GPU.md, 2026-12-04): bf16 matmuls measure 790 TFLOP/s; 4.8 TB/s of memory (its data
# sheet). Random weights of the bundled shapes with the alias's tokenizer, so its vocabulary (49,152), not the shapes'
# own (128,256 and 32,000); rows as lorakit's data and order (seed 42) make them from ../shared/data/guanaco, steps 2..8
# timed. Unpacked rows are padded: `speed_seq` is the mean length the micro-batches were padded to, the length every
# row of a step computes at, and `tokens` the real tokens of a step, which tokens/s counts. Memory is one quantity for
# both runs, the allocator's peak (torch.cuda.max_memory_allocated), which leaves out the CUDA context, the
# allocator's cache and bitsandbytes' paged optimizer states. Three constants (LoRA's cost per FLOP, QLoRA's bytes
# per weight and use, the activations' factor) fitted to these two runs: the 7B's memory is the only check the fit
# did not make, so this holds the fit in place and validates nothing; `make bench-gpu`'s rows will.
H200, H200_BANDWIDTH, VOCAB = 790e12, 4.8e12, 49_152
GPU_RUNS = [
    {"run": "1B LoRA r16, packed 8 x 2048", "model": "meta-llama/Llama-3.2-1B-Instruct",
     "setup": plan.Setup(method="lora", seq_len=2048, batch=8, r=16, trained_share=0.82),
     "speed_seq": 2048, "tokens": 16364, "tokens_per_s": 41882, "allocated_mib": 35221},
    # The QLoRA recipe as adapter.attach trains it now: bf16 LoRA weights, no kbit preparation ("LoRA weights cast
    # to bf16" in GPU.md). Before, with both: 1,006 tokens/s and 9,482 MiB allocated. 777 padded, ~426 real a row.
    {"run": "7B QLoRA recipe, r64, <= 1024 unpacked", "model": "meta-llama/Llama-2-7b-hf",
     "setup": plan.Setup(method="qlora", seq_len=1024, batch=4, r=64, checkpointing=True,
                         optimizer="paged_adamw_8bit", trained_share=0.854),
     "speed_seq": 777, "tokens": 11918 / 7, "tokens_per_s": 1870, "allocated_mib": 6560},
]  # fmt: skip


def predicted(point: dict) -> tuple[float, float]:
    """(allocated MiB, tokens/s) the planner predicts for one recorded run, with the vocabulary it ran with."""
    shape, setup = replace(plan.load_shape(point["model"]), vocab=VOCAB), point["setup"]
    parts = plan.memory(shape, setup)
    paged = parts["optimizer_states"] if setup.optimizer == "paged_adamw_8bit" else 0  # outside the allocator
    mib = (sum(parts.values()) - parts["framework"] - paged) / plan.MIB
    seconds = plan.step_seconds(shape, replace(setup, seq_len=point["speed_seq"]), H200, H200_BANDWIDTH)
    return mib, point["tokens"] / seconds


def test_the_gpu_constants_meet_the_recorded_h200_runs(capsys):
    """The fitted numbers within 1% (both speeds, the 1B's memory), the 7B's memory, which the fit did not make,
    within plan's target of 15% (arithmetic on recorded numbers: nothing is timed here)."""
    lines = [f"{'run':<40}{'MiB':>9}{'plan':>9}{'error':>8}{'tokens/s':>10}{'plan':>9}{'error':>8}"]
    for point, memory_target in zip(GPU_RUNS, (0.01, 0.15)):
        mib, speed = predicted(point)
        memory_error, speed_error = mib / point["allocated_mib"] - 1, speed / point["tokens_per_s"] - 1
        lines.append(f"{point['run']:<40}{point['allocated_mib']:>9}{mib:>9.0f}{memory_error:>8.1%}"
                     f"{point['tokens_per_s']:>10}{speed:>9.0f}{speed_error:>8.1%}")  # fmt: skip
        assert abs(memory_error) <= memory_target and abs(speed_error) <= 0.01, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_dequantization_is_priced_at_the_memory_bandwidth():
    """QLoRA's dequantization moves bytes: a GPU with the same matmul peak and less memory bandwidth (an H100 beside
    an H200) takes longer over it, and only over it: LoRA's step is the same on both."""
    seven = replace(plan.load_shape("meta-llama/Llama-2-7b-hf"), vocab=VOCAB)
    qlora = replace(GPU_RUNS[1]["setup"], seq_len=777)
    h100, h200 = (plan.step_seconds(seven, qlora, H200, bandwidth) for bandwidth in (3.35e12, H200_BANDWIDTH))
    quantized = seven.layers * seven.layer_params * 3  # weights x uses: forward, input gradient, recompute
    assert h100 - h200 == pytest.approx(plan.DEQUANT_BYTES["cuda"] * quantized * (1 / 3.35e12 - 1 / H200_BANDWIDTH))
    lora = replace(qlora, method="lora")
    assert plan.step_seconds(seven, lora, H200, 3.35e12) == plan.step_seconds(seven, lora, H200, H200_BANDWIDTH)
    gpus = plan.common_gpus()
    assert (gpus["H100 80GB"].flops, gpus["H100 80GB"].bandwidth) == (gpus["H200 141GB"].flops, 3.35e12)
    fits = plan.estimate(seven, qlora, gpus).fits
    assert fits["H100 80GB"]["tokens_per_s"] < fits["H200 141GB"]["tokens_per_s"]
