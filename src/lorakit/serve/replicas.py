"""`lorakit serve --replicas`: lorakit's engine as Ray Serve replicas behind one OpenAI-compatible address.

The command's side: the options checked before anything starts, Ray joined (--address) or started here, the
application (deployments.py: a router and autoscaled engine replicas) deployed with Ray's autoscaling on the
requests in flight per replica, and taken down on Ctrl-C. Ray is imported only once --replicas is given
(`deployments()`): lorakit itself never needs it.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.options import ServeOptions
from lorakit.serve import server

log = logging.getLogger("lorakit.serve")
# A replica being removed finishes its requests first, for at most this long (a long answer on a CPU takes minutes).
DRAIN_S = 600.0


def span(text: str) -> tuple[int, int]:
    """--replicas N or MIN..MAX as (min, max)."""
    low, sep, high = text.partition("..")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise LorakitError(f"--replicas {text}: give N or MIN..MAX, e.g. --replicas 2 or --replicas 1..5") from None
    if lo < 0 or hi < 1 or lo > hi:
        raise LorakitError(f"--replicas {text}: MIN..MAX needs 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def check(opts: ServeOptions) -> tuple[int, int]:
    """(min, max) replicas, or one message for options that do not go with --replicas."""
    if opts.replicas is None:
        raise LorakitError("--address joins a Ray cluster to serve from replicas: give --replicas too")
    if opts.engine == "vllm":
        raise LorakitError("--replicas serves lorakit's own engine; vLLM scales itself (leave out --engine vllm)")
    if opts.watch and not opts.adapters_dir:
        raise LorakitError("--watch needs --adapters-dir: the folder to watch for new adapter versions")
    if opts.target_queue <= 0:
        raise LorakitError(f"--target-queue {opts.target_queue:g}: must be above 0 (requests per replica)")
    return span(opts.replicas)


def autoscaling(opts: ServeOptions, lo: int, hi: int) -> dict:
    """Ray Serve's AutoscalingConfig: between lo and hi replicas, aiming at --target-queue requests in flight or
    queued per replica, as `QueueDepthAutoscaler(max_containers=hi, tasks_per_container=target)` does."""
    # Ray decides on the queue averaged over look_back_period_s, and hears of it every metrics_interval_s: both
    # shorter than the delays (Ray's defaults are 30 s and 10 s), or the delays would not be what they say.
    look_back = min(30.0, max(0.5, min(opts.upscale_delay_s, opts.downscale_delay_s)))
    return {
        "min_replicas": lo,
        "initial_replicas": max(lo, 1),
        "max_replicas": hi,
        "target_ongoing_requests": opts.target_queue,
        "upscale_delay_s": opts.upscale_delay_s,
        "downscale_delay_s": opts.downscale_delay_s,
        "look_back_period_s": look_back,
        "metrics_interval_s": look_back / 4,
    }


def deployments() -> Any:
    """The module of the deployments, which imports Ray Serve; one message where that is not installed."""
    try:
        from lorakit.serve import deployments
    except ImportError as e:  # ray, or one of ray[serve]'s packages
        raise LorakitError(
            f"--replicas serves on Ray Serve, which cannot be imported here ({e}): pip install 'lorakit[ray]'"
        ) from None
    return deployments


def application(opts: ServeOptions, lo: int, hi: int):  # -> a bound Ray Serve application
    d = deployments()
    scaling = {"num_replicas": lo} if lo == hi else {"autoscaling_config": autoscaling(opts, lo, hi)}
    engine = d.Engine.options(
        **scaling,
        # Room for a full batch on each replica: its engine decodes up to --max-batch requests together.
        max_ongoing_requests=max(opts.max_batch if opts.batching == "on" else 1, math.ceil(opts.target_queue)),
        ray_actor_options={"num_cpus": opts.replica_cpus, "num_gpus": opts.replica_gpus},
        graceful_shutdown_timeout_s=DRAIN_S,
        graceful_shutdown_wait_loop_s=0.5,
    )
    return d.Router.bind(engine.bind(opts), opts)


def start(opts: ServeOptions) -> tuple[int, int]:
    """Join --address (else start Ray here) and deploy; returns (min, max) replicas once the router and the first
    replicas serve."""
    lo, hi = check(opts)
    app = deployments()
    import ray
    from ray import serve

    opts = located(server.resolve_model(opts))
    try:
        ray.init(address=opts.address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - whatever Ray raises (a bare Exception when it starts too slowly)
        where = f"join the Ray cluster at --address {opts.address}" if opts.address else "start Ray on this machine"
        raise LorakitError(f"could not {where}: {e}") from None
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if opts.replica_cpus and cpus < hi * opts.replica_cpus:
        log.warning(
            "the Ray cluster has %g CPUs: %d replicas of --replica-cpus %g do not all fit (on a cluster, Ray's "
            "autoscaler may add nodes)",
            cpus,
            hi,
            opts.replica_cpus,
        )
    serve.start(http_options={"host": opts.host, "port": opts.port})
    # No access log: lorakit's single-process server keeps none either, and the replicas' reports would fill it.
    serve.run(application(opts, lo, hi), name=app.APP, route_prefix="/", logging_config={"enable_access_log": False})
    return lo, hi


def located(opts: ServeOptions) -> ServeOptions:
    """Local paths made absolute: replicas run in other processes (on a cluster, other machines), whose working
    folder is not this one's."""

    def absolute(path: str) -> str:
        return str(Path(path).absolute()) if Path(path).exists() else path  # a hub id or an alias stays

    return replace(
        opts,
        model=absolute(opts.model),
        adapters={name: absolute(path) for name, path in opts.adapters.items()},
        adapters_dir=opts.adapters_dir and absolute(opts.adapters_dir),
    )


def stop(opts: ServeOptions) -> None:
    """Take the application down; Ray itself too when this process started it."""
    import ray
    from ray import serve

    with suppress(Exception):  # Ray may be half gone already (Ctrl-C reaches its processes too)
        serve.delete(deployments().APP) if opts.address else serve.shutdown()
    ray.shutdown()


def run(opts: ServeOptions) -> int:
    check(opts)  # before anything starts
    deployments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.listen(opts.host, opts.port).close()  # a busy port fails at once, not after Ray has started
    done = threading.Event()

    def finish(*_) -> None:  # the replicas finish their answers first (DRAIN_S); a second Ctrl-C stops at once
        done.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, finish)
    try:
        lo, hi = start(opts)
        print(
            f"serving {opts.served_model_name or opts.model} from {lo if lo == hi else f'{lo} to {hi}'} Ray Serve "
            f"replicas on http://{opts.host}:{opts.port}/v1 (metrics of all replicas: /metrics; their adapters: "
            "/v1/lorakit/replicas)",
            flush=True,
        )
        done.wait()
    finally:
        stop(opts)
    return 0
