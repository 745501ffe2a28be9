"""Wiring of `lorakit serve`: the app built from its options, the adapter watcher, uvicorn or vLLM.

`build` loads the base and the adapters and returns the app with its Serving; `run` adds the watcher
(--watch, SIGHUP) and serves the app with uvicorn, or execs vLLM's server with the same model and adapters.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.options import ServeOptions
from lorakit.run_folder import RunFolder, adapter_dir, check_finished, find_adapter
from lorakit.serve import threads

log = logging.getLogger("lorakit.serve")


def resolve_model(opts: ServeOptions) -> ServeOptions:
    """A run config (YAML) stands for its base model plus its trained adapter (named after output_dir)."""
    if not opts.model.endswith((".yaml", ".yml")):
        return opts
    from lorakit import config, model

    cfg = config.load(opts.model)
    adapters = dict(opts.adapters)
    run = RunFolder.of(cfg)
    if (adapter := find_adapter(run.root)) is not None:
        adapters.setdefault(run.name, str(adapter))
    else:
        check_finished(run.root)  # a run that started but saved no adapter yet: say so, not serve the base alone
        log.warning("%s has no trained adapter yet (`lorakit train %s`): serving the base alone", run.root, opts.model)
    # A QLoRA adapter answers as trained only on the 4-bit base it was trained on.
    precision = model.base_quantization(opts.base_precision, [cfg.method]) or "full"
    return replace(opts, model=cfg.model, adapters=adapters, base_precision=precision)


def build(opts: ServeOptions):  # -> (FastAPI app, Serving)
    """Load the base, the --adapter ones and those of --adapters-dir; the app and its Serving."""
    from lorakit import model
    from lorakit.serve.adapters import adapters_in
    from lorakit.serve.app import create_app
    from lorakit.serve.serving import Serving

    opts = resolve_model(opts)
    device = model.pick_device(opts.device)
    dtype = model.pick_dtype(opts.dtype, device)
    adapters_dir = Path(opts.adapters_dir) if opts.adapters_dir else None
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise LorakitError(f"--adapters-dir {adapters_dir}: not a folder")
    tokenizer = model.load_tokenizer(opts.model)
    # auto: the 4-bit base when the adapters at hand are all QLoRA ones, as eval does (each load warns otherwise).
    starting = [*opts.adapters.values(), *(adapters_in(adapters_dir).values() if adapters_dir else [])]
    quantization = model.base_quantization(opts.base_precision, map(method_of, starting))
    base = model.load_model(opts.model, dtype=dtype, device=device, quantization=quantization)
    batching = opts.batching == "on"
    serving = Serving(
        base,
        tokenizer,
        opts.served_model_name or opts.model,
        adapters_dir=adapters_dir,
        max_adapters=opts.max_adapters,
        max_batch=opts.max_batch if batching else 1,
        window_s=opts.batch_window_ms / 1000 if batching else 0.0,
        per_row_adapters=batching,
        max_tokens_limit=opts.max_tokens_limit,
        max_model_len=opts.max_model_len,
        base_name=opts.model,
        force=opts.force,
        quantization=quantization,
    )
    for name, path in opts.adapters.items():
        try:
            # --adapter paths are the operator's own choice: only run-time loads are confined to adapters_dir.
            serving.registry.load(name, adapter_dir(path), confined=False)
        except (ValueError, OSError) as e:
            raise LorakitError(f"--adapter {name}={path}: {e}") from None
    if adapters_dir is not None:
        serving.registry.scan(adapters_dir)  # logs each adapter that does not load; its error shows in /v1/models
    return create_app(serving, opts.api_key, opts.max_body_bytes, ui=not opts.no_ui), serving


def method_of(path: str | Path) -> str | None:
    """The method of the run an adapter at start came from, for the base's precision; None when its run's
    config.yaml cannot be read: its load then says why (--adapter: at start; --adapters-dir: in /v1/models)."""
    from lorakit import adapter

    try:
        return adapter.trained_with(path)
    except LorakitError:
        return None


@dataclass
class Watcher:
    wake: threading.Event  # set it (SIGHUP does) to rescan now
    scanned: threading.Event  # set after each scan
    stop: threading.Event


def watch(serving, folder: Path, interval_s: float | None) -> Watcher:
    """Rescan `folder` every interval (None: never by itself), and at once when `wake` is set, until `stop`."""
    w = Watcher(threading.Event(), threading.Event(), threading.Event())

    def loop() -> None:
        while not w.stop.is_set():
            w.wake.wait(interval_s)
            w.wake.clear()
            try:
                for name in serving.registry.scan(folder):
                    log.info("loaded a new version of adapter %s", name)
            except Exception:  # the folder vanished, or a bug: this thread must outlive it
                log.exception("scanning %s failed; trying again at the next scan", folder)
            w.scanned.set()

    threading.Thread(target=loop, name="lorakit-watch", daemon=True).start()
    return w


def vllm_command(opts: ServeOptions):  # -> (vllm.Launch, secret environment)
    """vLLM's OpenAI server with the same base, adapters, name, host, port, limits and precision (export/vllm.py),
    run by the Python that has vLLM; and the environment to add for the key: it travels as VLLM_API_KEY, not in
    argv, where any local user could read it in the process list.
    """
    from lorakit.export import vllm

    opts = resolve_model(opts)
    if opts.watch:
        raise LorakitError("--watch is a feature of lorakit's own engine; vLLM loads its adapters at start")
    adapters = {n: adapter_dir(p) for n, p in opts.adapters.items()}
    if opts.adapters_dir:
        from lorakit.serve.adapters import adapters_in

        adapters |= {n: p for n, p in adapters_in(Path(opts.adapters_dir)).items() if n not in adapters}
    python = vllm.python(opts.vllm_python)
    return vllm.launch(opts, adapters, python), {"VLLM_API_KEY": opts.api_key} if opts.api_key else {}


def run(opts: ServeOptions) -> int:
    if opts.engine == "vllm":
        launch, secret = vllm_command(opts)
        for note in launch.notes:
            print(f"warning: {note}", file=sys.stderr)
        print(launch.shell(), flush=True)
        # The caller's own settings of vLLM's variables (VLLM_CPU_KVCACHE_SPACE) win over the sized ones.
        os.execve(launch.argv[0], launch.argv, {**launch.env, **os.environ, **secret})
    import uvicorn

    if opts.watch and not opts.adapters_dir:
        raise LorakitError("--watch needs --adapters-dir: the folder to watch for new adapter versions")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(opts.host, opts.port)  # before loading anything: a busy port fails at once
    threads.apply(opts.threads)  # before torch loads (in build): libgomp and MKL read OMP_NUM_THREADS once
    app, serving = build(opts)
    if opts.adapters_dir:  # SIGHUP rescans the folder; --watch also rescans it every few seconds
        watcher = watch(serving, Path(opts.adapters_dir), opts.watch_interval_s if opts.watch else None)
        signal.signal(signal.SIGHUP, lambda *_: watcher.wake.set())
    print(
        f"serving {serving.served_name} with adapters {list(serving.registry.known)} on "
        f"http://{opts.host}:{opts.port}/v1"
        + ("" if opts.no_ui else f"; the explorer page: http://{opts.host}:{opts.port}/"),
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening; one message if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server may reuse the port at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise LorakitError(
            f"cannot listen on {host}:{port}: {e.strerror or e}. Is another server running there? "
            "Stop it or pick another --port"
        ) from None
    return sock
