"""`lorakit serve`: one base model, many LoRA adapters, an OpenAI-compatible API.

app.py (routes) → serving.py (request logic) → engine.py (batched decoding) and adapters.py
(registry, hot reload). `build` wires them; `run` adds the watcher and uvicorn.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit.serve")


@dataclass
class ServeOptions:
    model: str
    served_model_name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    adapters_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_adapters: int | None = None
    max_batch: int = 8
    batching: bool = True
    watch: bool = False
    watch_interval_s: float = 2.0
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    engine: str = "lorakit"


def resolve_model(opts: ServeOptions) -> ServeOptions:
    """A run config (YAML) stands for its base model plus its trained adapter."""
    if opts.model.endswith((".yaml", ".yml")):
        from lorakit import config

        cfg = config.load(opts.model)
        adapter = Path(cfg.output_dir) / "adapter"
        adapters = dict(opts.adapters)
        if (adapter / "adapter_config.json").is_file():
            adapters.setdefault(Path(cfg.output_dir).name, str(adapter))
        return ServeOptions(**{**opts.__dict__, "model": cfg.model, "adapters": adapters})
    return opts


def build(opts: ServeOptions):  # -> (FastAPI app, Serving)
    from lorakit import model
    from lorakit.adapter import adapter_dir
    from lorakit.serve.app import create_app
    from lorakit.serve.serving import Serving

    opts = resolve_model(opts)
    tokenizer = model.load_tokenizer(opts.model)
    base = model.load_model(opts.model)
    adapters_dir = Path(opts.adapters_dir) if opts.adapters_dir else None
    serving = Serving(base, tokenizer, opts.served_model_name or opts.model, adapters_dir=adapters_dir,
                      max_adapters=opts.max_adapters, max_batch=opts.max_batch if opts.batching else 1,
                      window_s=0.01 if opts.batching else 0.0, max_tokens_limit=opts.max_tokens_limit)
    # --adapter paths are the operator's own choice: only the load endpoint is confined to adapters_dir.
    confined, serving.registry.allowed_dir = serving.registry.allowed_dir, None
    for name, path in opts.adapters.items():
        try:
            serving.registry.load(name, adapter_dir(path))  # a run folder stands for its adapter/
        except (ValueError, OSError) as e:
            raise LorakitError(f"--adapter {name}={path}: {e}") from None
    serving.registry.allowed_dir = confined
    if adapters_dir is not None:
        if not adapters_dir.is_dir():
            raise LorakitError(f"--adapters-dir {adapters_dir}: not a folder")
        serving.registry.scan(adapters_dir)
    return create_app(serving, opts.api_key, opts.max_body_bytes), serving


@dataclass
class Watcher:
    wake: threading.Event  # set it (SIGHUP does) to rescan now
    scanned: threading.Event  # set after each scan


def watch(serving, folder: Path, interval_s: float) -> Watcher:
    """Rescan `folder` every interval, or at once when `wake` is set."""
    w = Watcher(threading.Event(), threading.Event())

    def loop() -> None:
        while True:
            w.wake.wait(interval_s)
            w.wake.clear()
            try:
                for name in serving.registry.scan(folder):
                    log.info("loaded new version of adapter %s", name)
            except OSError as e:
                log.error("scanning %s failed: %s", folder, e)
            w.scanned.set()

    threading.Thread(target=loop, name="lorakit-watch", daemon=True).start()
    return w


def vllm_command(opts: ServeOptions) -> list[str]:
    """The vLLM OpenAI server with the same base, adapters, name, host, port and key."""
    from lorakit import export, model
    from lorakit.adapter import adapter_dir

    opts = resolve_model(opts)
    adapters = {n: adapter_dir(p) for n, p in opts.adapters.items()}
    if opts.adapters_dir:
        adapters |= {d.name: d for d in sorted(Path(opts.adapters_dir).iterdir()) if (d / "adapter_config.json").is_file()}
    if adapters:
        cmd = shlex.split(export.vllm_command(opts.model, adapters, opts.port))
    else:
        resolved = model.resolve(opts.model)
        cmd = ["vllm", "serve", resolved.path if resolved.kind != "hub" else opts.model, "--port", str(opts.port)]
    cmd += ["--host", opts.host, "--served-model-name", opts.served_model_name or opts.model]
    if opts.api_key:
        cmd += ["--api-key", opts.api_key]
    return cmd


def run(opts: ServeOptions) -> int:
    if opts.engine == "vllm":
        cmd = vllm_command(opts)
        if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is None:
            raise LorakitError("--engine vllm needs vLLM (GPU machines): pip install vllm. It would run:\n  "
                               + shlex.join(cmd))
        print(shlex.join(cmd), flush=True)
        os.execvp(cmd[0], cmd)
    import uvicorn

    app, serving = build(opts)
    if opts.watch:
        if not opts.adapters_dir:
            raise LorakitError("--watch needs --adapters-dir: the folder to watch for new adapter versions")
        watcher = watch(serving, Path(opts.adapters_dir), opts.watch_interval_s)
        signal.signal(signal.SIGHUP, lambda *_: watcher.wake.set())
    print(f"serving {serving.served_name} with adapters {list(serving.registry.active)} on "
          f"http://{opts.host}:{opts.port}/v1", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning")
    return 0
