"""bench/gpu_suite.py and bench/train_vs_peers.py without a GPU (issue 32): TRL runs each row the way its docs recommend
for the attention the machine has, liger-kernel's kernels go to both systems or neither, each process's time limit
comes from the cost model plus a floor, and a process out of time is "not measured", never a lorakit failure.
`make test` also runs the whole suite at toy size (`gpu_suite.py --tiny`)."""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402 - bench/ is not a package
import train_vs_peers as peers  # noqa: E402

QLORA, LORA_1B = gpu_suite.ROWS[0], gpu_suite.ROWS[2]


@pytest.mark.parametrize("liger", [False, True])
def test_trl_is_padding_free_only_on_flash_attention(liger):
    """GPU.md's packed 1B ran TRL padding-free on sdpa: 8 x 2048 as one 16,384-token row under a dense mask."""
    flash = peers.trl_setting(packed=True, batch=8, accum=1, flash=True, liger=liger)
    assert flash["attention"] == "flash_attention_2"
    assert flash["config"] | {"use_liger_kernel": None} == {"padding_free": True, "per_device_train_batch_size": 8,
                                                             "gradient_accumulation_steps": 1, "loss_type": "nll",
                                                             "use_liger_kernel": None}  # fmt: skip
    # sdpa, packed rows: one row per micro-batch (the mask is one row's), the same 8 rows a step by accumulation
    packed = peers.trl_setting(packed=True, batch=8, accum=2, flash=False, liger=liger)
    assert packed["attention"] == "sdpa" and packed["config"]["padding_free"]
    assert (packed["config"]["per_device_train_batch_size"], packed["config"]["gradient_accumulation_steps"]) == (1, 16)
    # sdpa, unpacked rows: padded, as TRL's default collator pads them
    padded = peers.trl_setting(packed=False, batch=4, accum=2, flash=False, liger=liger)
    assert not padded["config"]["padding_free"]
    assert (padded["config"]["per_device_train_batch_size"], padded["config"]["gradient_accumulation_steps"]) == (4, 2)
    for setting in (flash, packed, padded):
        assert setting["config"]["loss_type"] == "nll" and setting["config"]["use_liger_kernel"] is liger
        assert "chunked NLL" in setting["words"] and ("liger" in setting["words"]) is liger
    assert "flash-attention 2" in flash["words"] and "one packed row per micro-batch" in packed["words"]
    assert "padded rows" in padded["words"]


@pytest.fixture(autouse=True)
def trl_present(monkeypatch):
    """The rows' processes are faked here: TRL need not be installed (make test installs no bench extra)."""
    monkeypatch.setattr(gpu_suite, "trl_installed", lambda: True)


def suite(tmp_path, liger=False, budget=10_000.0, tiny=False) -> gpu_suite.Suite:
    s = gpu_suite.Suite(tmp_path, tmp_path, tiny, tmp_path, time.time(), budget, 6, None, liger)
    made = {"llama-2-7b": 20.0, "llama-3.2-1b": 4.0}  # seconds prepare took to make and save them
    s.device = {"kind": "cuda", "name": "test GPU", "torch": "x", "memory_bytes": 80 * 2**30,
                "matmul_flops": gpu_suite.REFERENCE_FLOPS, "made_s": made}  # fmt: skip
    s.models = {shape: str(tmp_path / shape) for shape in gpu_suite.SHAPES}
    (tmp_path / "logs").mkdir(exist_ok=True)
    return s


@pytest.mark.parametrize("liger", [False, True])
def test_liger_is_for_both_systems_or_neither(tmp_path, monkeypatch, liger):
    """--no-liger (or no liger-kernel) turned TRL's kernels off while lorakit's train.kernels auto kept its own."""
    s = suite(tmp_path, liger=liger)
    specs = {}

    def spawn(cmd, s, name, limit_s):
        specs[name] = gpu_suite.json.loads(Path(cmd[-1]).read_text())
        return 1, "", None

    monkeypatch.setattr(gpu_suite, "spawn", spawn)
    monkeypatch.setattr(gpu_suite, "last_error", lambda s, name, rc: "failed")
    gpu_suite.train_row(s, LORA_1B, [], {})
    lorakit, trl = specs["lora-1b-lorakit"], specs["lora-1b-trl"]
    assert lorakit["config"]["train"]["kernels"] == ("auto" if liger else "none")
    assert lorakit["liger"] is trl["liger"] is liger


def test_each_process_gets_its_expected_seconds_times_slack_plus_a_floor(tmp_path, monkeypatch):
    """The 7B QLoRA process got ~54 s from a guessed share of the budget, to load 13.5 GB, quantize and train."""
    s = suite(tmp_path)
    expected = gpu_suite.START + 2 * 20.0 + gpu_suite.FIRST_STEP + 6 * QLORA.step_s[0]  # made in 20 s; 4-bit packing
    assert gpu_suite.process_s(s, QLORA, "lorakit", 6) == pytest.approx(expected)
    s.device["matmul_flops"] = gpu_suite.REFERENCE_FLOPS / 2  # a device at half the H200's measured peak
    assert gpu_suite.process_s(s, QLORA, "lorakit", 6) == pytest.approx(expected + 6 * QLORA.step_s[0])
    s.device["matmul_flops"] = gpu_suite.REFERENCE_FLOPS
    limits = {}

    def run_child(s, name, system, body, limit_s, expected):
        limits[name] = (limit_s, expected)
        return {"losses": [1.0] * 6, "tokens_per_s": 1.0, "plan": {"peak_mib": 1, "tokens_per_s": 1.0}}

    monkeypatch.setattr(gpu_suite, "run_child", run_child)
    monkeypatch.setattr(gpu_suite, "run_body", lambda s, row, system, steps: {})
    out = gpu_suite.train_row(s, QLORA, [], {"serve": 60.0, "pytest": 45.0})
    limit_s, given = limits["qlora-7b-lorakit"]
    assert given == pytest.approx(expected) and limit_s == pytest.approx(gpu_suite.SLACK * expected + gpu_suite.FLOOR)
    assert out["steps"] == 6 and not s.failures
    # Short of time: the limit is what the budget has left less what serving and pytest are guaranteed.
    s.budget = s.elapsed() + expected + 10 + sum(gpu_suite.MINIMUM.values())
    assert gpu_suite.limit(s, expected, sum(gpu_suite.MINIMUM.values())) == pytest.approx(expected + 10, abs=1)


def test_a_process_out_of_time_is_not_measured_never_a_lorakit_failure(tmp_path, monkeypatch):
    s = suite(tmp_path)
    monkeypatch.setattr(gpu_suite, "spawn", lambda cmd, s, name, limit_s: (None, "", None))  # stopped at its limit
    monkeypatch.setattr(gpu_suite, "run_body", lambda s, row, system, steps: {})
    stopped = gpu_suite.train_row(s, QLORA, [], {})
    lorakit = stopped["systems"]["lorakit"]
    assert lorakit["not_measured"].startswith("stopped at its limit of") and "error" not in lorakit
    serve, tests = gpu_suite.serve_row(s, 0), gpu_suite.pytest_row(s)
    assert "not_measured" in serve and "not_measured" in tests and "error" not in serve
    assert s.failures == []
    table = gpu_suite.markdown(s, [stopped], serve, tests)
    assert table.count("not measured: stopped at its limit") == 4, table  # lorakit, TRL, serving, pytest
    # With too little of the budget left to start, the process is not started at all.
    s.budget = s.elapsed() + 10
    never = gpu_suite.train_row(s, QLORA, [], {})["systems"]["lorakit"]
    assert "s of the budget left" in never["not_measured"] and s.failures == []
    # --tiny (make test) exists to check that every row runs: there, a lorakit row that did not is a failure.
    tiny = suite(tmp_path, tiny=True)
    gpu_suite.train_row(tiny, QLORA, [], {})
    assert len(tiny.failures) == 1 and "stopped at its limit" in tiny.failures[0]
    # What does count as a failure: a lorakit process that ends in an error.
    s.budget = 10_000.0
    monkeypatch.setattr(gpu_suite, "spawn", lambda cmd, s, name, limit_s: (1, "", None))
    monkeypatch.setattr(gpu_suite, "last_error", lambda s, name, rc: "RuntimeError: boom")
    gpu_suite.train_row(s, QLORA, [], {})
    assert s.failures == ["qlora-7b lorakit: RuntimeError: boom"]


def test_pytest_keeps_its_minimum_when_the_budget_is_spent(tmp_path, monkeypatch):
    s = suite(tmp_path, budget=1.0)
    given = []
    monkeypatch.setattr(gpu_suite, "spawn", lambda cmd, s, name, seconds: given.append(seconds) or (0, "", None))
    assert gpu_suite.pytest_row(s)["returncode"] == 0 and given == [gpu_suite.MINIMUM["pytest"]]


def test_the_default_suite_is_expected_inside_nine_minutes_on_an_h100():
    """GPU.md's H200 step costs, at the H100's lower memory bandwidth (its bf16 data sheet peak is the H200's), with
    --wheels' install: inside the default budget, itself inside 9 minutes."""
    h100 = gpu_suite.expected_suite_s(6, pace=gpu_suite.H100_PACE, install=gpu_suite.INSTALL_S)
    assert h100 < gpu_suite.DEFAULT_BUDGET < 9 * 60
    assert gpu_suite.expected_suite_s(6) < h100


def test_the_dpo_row_is_lorakit_against_trl_twice_and_runs_when_named(tmp_path, monkeypatch):
    """issue 33: the DPO bench's row on the 1B, TRL with its defaults and with its reference precomputed."""
    from lorakit import config

    row = next(r for r in gpu_suite.ROWS if r.name == "dpo-1b")
    assert row.optional and row not in gpu_suite.DEFAULT_ROWS, "three more processes do not fit the default budget"
    s = suite(tmp_path)
    bodies = {}

    def run_child(s, name, system, body, limit_s, expected):
        bodies[name] = body
        return {"losses": [0.6931] * 6, "tokens_per_s": 1.0, "plan": {"peak_mib": 1, "tokens_per_s": 1.0},
                "setting": system, "peak_mib": 1, "peak_source": "nvidia-smi"}  # fmt: skip

    monkeypatch.setattr(gpu_suite, "run_child", run_child)
    out = gpu_suite.train_row(s, row, [], {})
    assert list(out["systems"]) == ["lorakit", "trl", "trl_precompute"] and not s.failures
    assert gpu_suite.row_cost(s, row, 6) == pytest.approx(
        sum(gpu_suite.process_s(s, row, system, 6) for system in ("lorakit", "trl", "trl_precompute"))
    )
    for name, body in bodies.items():
        cfg = config.validate(body)
        assert cfg.objective == "dpo" and cfg.preference.beta == 0.1 and cfg.preference.loss == "sigmoid", name
        assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.data.max_length) == (4, 1, 1024), name
        assert cfg.data.limit == 6 * 4 and cfg.data.train.endswith("preference/dpo_en_demo.json"), name
    table = gpu_suite.markdown(s, [out], None, None)
    assert "(trl)" in table and "(trl_precompute)" in table, table
    arms = {arm: {"error": "TRL not installed"} for arm in ("trl", "trl_precompute")}  # make test: no bench extra
    table = gpu_suite.markdown(s, [{**out, "systems": {"lorakit": out["systems"]["lorakit"], **arms}}], None, None)
    assert "| TRL (trl) |" in table and "| TRL (trl_precompute) |" in table, "the two arms apart when not run"
