"""Training on several processes (torchrun, gloo on the CPU): the same losses and weights as one process with
the same global batch, two "hosts" rendezvousing on 127.0.0.1, a killed rank that resumes exactly, and a launcher
that speaks for its ranks (one message for a failure, a Ctrl-C or a SIGTERM) and takes them along when killed."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit import cli, config, train
from tiny import save_tiny

pytestmark = pytest.mark.slow

ROWS = [
    {"prompt": f"reverse: {a} {b} {c}", "completion": f"{c} {b} {a}"}
    for a in ("red", "green", "blue", "cat")
    for b in ("one", "two", "sun", "moon")
    for c in ("dog", "fish", "star")
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), arch="llama")


def run_file(tmp_path: Path, base: Path, name: str, batch_size: int, **train_keys) -> Path:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    body = {
        "model": str(base),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},  # dropout would draw other masks on each rank
        "data": {"train": str(rows), "max_length": 64, "cache_dir": str(tmp_path / "cache"), "packing": False},
        "train": {"max_steps": 6, "batch_size": batch_size, "lr": 5e-3, "seed": 0, "scheduler": "constant",
                  "max_grad_norm": None, **train_keys},
        "output_dir": str(tmp_path / name),
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def lorakit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == pytest.approx(losses(b), rel=1e-5), "per-step losses"
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys() and all(wb[k].abs().sum() > 0 for k in wb if "lora_B" in k), "a complete adapter"
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory):
    """The reference: one process, global batch 4."""
    tmp = tmp_path_factory.mktemp("one")
    train.run(config.load(run_file(tmp, base, "one", batch_size=4)), progress=False)
    return tmp / "one"


def test_two_processes_ddp_equal_one_with_the_same_global_batch(base, tmp_path, one_process):
    cfg = run_file(tmp_path, base, "ddp", batch_size=2)
    done = lorakit("train", str(cfg), "--nproc", "2", "--no-progress", f"--master-port={free_port()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(one_process, tmp_path / "ddp")
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp"


def test_two_hosts_rendezvous_on_loopback(base, tmp_path, one_process):
    cfg = run_file(tmp_path, base, "hosts", batch_size=2)
    port = free_port()
    launch = ["train", str(cfg), "--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", f"--master-port={port}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    hosts = [
        subprocess.Popen([sys.executable, "-m", "lorakit", *launch, f"--node-rank={rank}", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in (0, 1)
    ]  # fmt: skip
    for host in hosts:
        _, err = host.communicate(timeout=600)
        assert host.returncode == 0, err[-3000:]
    assert_same_run(one_process, tmp_path / "hosts")


def test_a_killed_rank_stops_the_run_and_resume_continues_exactly(base, tmp_path, capsys):
    whole = run_file(tmp_path, base, "whole", batch_size=2, save_every=2)
    assert lorakit("train", str(whole), "--nproc", "2", "--no-progress", f"--master-port={free_port()}").returncode == 0
    killed = run_file(tmp_path, base, "killed", batch_size=2, save_every=2)
    died = lorakit("train", str(killed), "--nproc", "2", "--no-progress", f"--master-port={free_port()}",
                   env={"LORAKIT_KILL_AFTER_STEP": "3", "LORAKIT_FAULT_RANK": "1"})  # fmt: skip
    assert died.returncode == 2
    # Rank 0 lost its peer in a collective: the cause is rank 1, and rank 0 says nothing (no gloo traceback).
    assert "training stopped: rank 1 was killed by SIGKILL" in died.stderr and "Traceback" not in died.stderr
    assert f"lorakit train {killed} --no-progress --nproc=2 --resume" in died.stderr
    # Another world size is refused before anything is written (here it would have said max_steps: 8) and, by
    # the launcher, before any rank starts.
    saved = (tmp_path / "killed" / "config.yaml").read_text()
    for nproc in ([], ["--nproc", "3"]):
        assert cli.main(["train", str(killed), "train.max_steps=8", "--no-progress", "--resume", *nproc]) == 2
        err = capsys.readouterr().err
        assert "written by 2 process(es); resume it with as many (--nproc 2)" in err and err.count("error:") == 1, err
        assert (tmp_path / "killed" / "config.yaml").read_text() == saved
    resumed = lorakit("train", str(killed), "--nproc", "2", "--no-progress", "--resume", f"--master-port={free_port()}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    one = lorakit("train", str(killed), "--no-progress", "--resume")
    assert one.returncode == 2 and "written by 2 process(es); resume it with as many (--nproc 2)" in one.stderr


def test_fsdp_saves_a_complete_adapter_on_gpus_and_says_why_not_on_cpus(base, tmp_path, one_process, capsys):
    """accelerate turns FSDP on over CUDA devices only (on CPU processes it would silently be DDP): on CPUs
    the run is refused with the reason; with 2 GPUs the sharded run saves a complete adapter."""
    cfg = run_file(tmp_path, base, "fsdp", batch_size=2, strategy="fsdp")
    if torch.cuda.device_count() < 2:
        assert cli.main(["train", str(cfg), "--nproc", "2"]) == 2
        assert "train.strategy: fsdp needs GPUs" in capsys.readouterr().err and not (tmp_path / "fsdp").exists()
        return
    done = lorakit("train", str(cfg), "--nproc", "2", "--no-progress", f"--master-port={free_port()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["strategy"] == "fsdp"
    assert_same_run(one_process, tmp_path / "fsdp")


def test_qlora_with_fsdp_is_refused_before_any_rank_starts(base, tmp_path, capsys):
    cfg = run_file(tmp_path, base, "qf", batch_size=2, strategy="fsdp")
    assert cli.main(["train", str(cfg), "method=qlora", "--nproc", "2"]) == 2
    assert "train.strategy: fsdp shards 16/32-bit weights" in capsys.readouterr().err


def agent_logs(stderr: str) -> list[str]:
    """torch's log lines (W1204 18:41:32.586000 10397 torch/distributed/...): the agent's, which lorakit quiets."""
    return re.findall(r"^[DIWEF]\d{4} \d\d:.*$", stderr, re.M)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_of_the_launcher_is_one_message_with_the_command_that_resumes(base, tmp_path, sig):
    cfg = run_file(tmp_path, base, "stopped", batch_size=2, save_every=2)
    # Rank 0 sends the signal to its launcher after step 3, as a terminal's Ctrl-C or a scheduler would.
    stopped = lorakit("train", str(cfg), "--nproc", "2", "--no-progress", f"--master-port={free_port()}",
                      env={"LORAKIT_SIGNAL_LAUNCHER_AFTER_STEP": f"3:{sig}", "LORAKIT_FAULT_RANK": "0"})  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    newest = tmp_path / "stopped" / "checkpoints" / "step-0000002"
    resume = f"lorakit train {cfg} --no-progress --nproc=2 --resume"
    message = [f"interrupted: the newest checkpoint is {newest}; continue the run with:", f"  {resume}"]
    assert stopped.stderr.splitlines()[-2:] == message, stopped.stderr[-3000:]
    assert stopped.stderr.count("interrupted") == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert not agent_logs(stopped.stderr), stopped.stderr[-3000:]
    if sig == "SIGINT":  # the command it gives continues the run (without --nproc 2 it was refused)
        resumed = lorakit(*shlex.split(resume)[1:], f"--master-port={free_port()}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == 6


def test_a_rank_s_error_is_the_launcher_s_one_message_and_resuming_is_not_suggested(base, tmp_path):
    """A bad row on a fresh run: rank 0 finds it (it tokenizes first) and rank 1 loses it while waiting for it."""
    cfg = run_file(tmp_path, base, "bad", batch_size=2)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(rows.read_text() + '{"prompt": "reverse: a b c"}\n')
    done = lorakit("train", str(cfg), "--nproc", "2", "--no-progress", f"--master-port={free_port()}")
    assert done.returncode == 2
    error = (f"error: rank 0 stopped the run: {rows}:49: missing field 'completion' (format prompt_completion); "
             "the row has ['prompt']. Fix or remove the row.")  # fmt: skip
    messages = [line for line in done.stderr.splitlines() if line.startswith(("error:", "note:"))]
    assert messages == [error], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "--resume" not in done.stderr and not agent_logs(done.stderr)


def test_ranks_die_with_a_killed_launcher(base, tmp_path):
    cfg = run_file(tmp_path, base, "orphans", batch_size=2, max_steps=100_000)  # far longer than this test
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(cfg), "--nproc", "2", "--no-progress",
         f"--master-port={free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    seen = []
    for line in launcher.stdout:  # until rank 0 says it starts training: both ranks have passed their setup
        seen.append(line)
        if line.startswith("training "):
            break
    ranks = psutil.Process(launcher.pid).children()
    try:
        assert len(ranks) == 2, "".join(seen)
        launcher.kill()
        launcher.wait(timeout=60)
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, "ranks trained on without their launcher"
    finally:
        for rank in ranks:
            if rank.is_running():
                rank.kill()
        launcher.stdout.close()
