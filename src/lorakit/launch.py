"""`lorakit train --nproc N`: one run on several processes or hosts, started by torchrun.

Each rank runs `python -m lorakit train CONFIG ...` (the same entry point `torchrun -m lorakit` and
`accelerate launch -m lorakit` start), and accelerate picks the backend from the environment torchrun
sets: NCCL between GPUs, gloo between CPU processes. The launcher checks the run folder once, before
any rank starts, and speaks for its ranks: a failed rank, a Ctrl-C or a SIGTERM becomes one message with
the rank's own error or the command that resumes the run. Its ranks die with it, even when it is killed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
from typing import Any

from lorakit.errors import LorakitError

# Set by the launcher for its ranks: its pid (tie_to_launcher), and that it gives their messages (record).
LAUNCHER = "LORAKIT_LAUNCHER_PID"
# gloo's TCP transport, in the error a rank gets when another rank's process has gone (the cause is there).
GLOO_PAIR = "gloo/transport/tcp/pair.cc"
LOST_PEERS = "it lost its connection to another rank, which stopped first (that rank's error says why)"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# TrainOptions that describe the launch itself: a rank runs inside it and never gets them.
LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")


def is_rank() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch) as one rank of a run."""
    return "LOCAL_RANK" in os.environ


def wanted(opts: Any) -> bool:
    """Whether the options ask for a launch (several processes, or several hosts) and this is not a rank."""
    return (bool(opts.nproc) or opts.nnodes > 1) and not is_rank()


def check_strategy(cfg: Any, on_gpu: bool, resume: bool = False) -> None:
    """Refuse what train.strategy cannot do here: accelerate shards (FSDP) over GPUs only, and an FSDP run's
    checkpoints hold its gathered weights but not its sharded optimizer states. The launcher asks before any rank
    starts, each rank again in its setup, and `lorakit plan --nproc` of each device it plans for."""
    if cfg.train.strategy != "fsdp":
        return
    if not on_gpu:
        raise LorakitError(
            "train.strategy: fsdp needs GPUs: accelerate shards a model over CUDA devices only (on "
            "CPU processes it would fall back to ddp). On CPUs use train.strategy: ddp"
        )
    if resume:
        raise LorakitError(
            "--resume: an FSDP run's checkpoints hold its gathered weights (usable by eval, merge "
            "and serve) but not its sharded optimizer states, so it cannot continue exactly; start "
            "it again, or train with train.strategy: ddp"
        )


def run(cfg: Any, config_path: str, overrides: list[str], opts: Any, local: bool) -> int:
    """Start `opts.nproc` ranks on this host (host `opts.node_rank` of `opts.nnodes`) and wait for them.

    A Ctrl-C or SIGTERM of this process stops the ranks and comes back as KeyboardInterrupt (the CLI then says
    how to resume); a failed rank as one LorakitError.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    args = get_args_parser().parse_args([
        f"--nproc-per-node={opts.nproc or 1}", f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}",
        f"--master-addr={opts.master_addr}", f"--master-port={opts.master_port}", "--module", "lorakit",
        *_rank_argv(config_path, overrides, opts, local), *(["--resume"] if opts.resume else []),
        *(["--overwrite"] if opts.overwrite else []),
    ])  # fmt: skip
    _quiet_agent()
    os.environ[LAUNCHER] = str(os.getpid())  # the ranks inherit it
    try:
        torchrun(args)
    except SignalException:
        # torchrun's agent caught Ctrl-C or SIGTERM and has passed it on to the ranks, which are gone.
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        raise LorakitError(_failed(e.failures, cfg, resume_command(config_path, overrides, opts, local))) from None
    finally:
        os.environ.pop(LAUNCHER, None)
    return 0


def resume_command(config_path: str, overrides: list[str], opts: Any, local: bool) -> str:
    """The command that continues a run from its newest checkpoint: the one that started it, with --resume."""
    launch = _launch_flags(opts) if opts.nproc or opts.nnodes > 1 else []
    return shlex.join(["lorakit", *_rank_argv(config_path, overrides, opts, local), *launch, "--resume"])


def _rank_argv(config_path: str, overrides: list[str], opts: Any, local: bool) -> list[str]:
    """A rank's command: every option of this one but the launch's own and --resume/--overwrite (added where
    they apply), from options.to_argv, so that a field added to TrainOptions reaches the ranks by itself."""
    from lorakit import options

    own = {f.name: f.default for f in dataclasses.fields(opts) if f.name in LAUNCH_OPTIONS}
    rank = dataclasses.replace(opts, **own, resume=False, overwrite=False)
    return ["train", config_path, *overrides, *(["--local"] if local else []), *options.to_argv(rank)]


def _launch_flags(opts: Any) -> list[str]:
    flags = [f"--nproc={opts.nproc or 1}"]
    if opts.nnodes > 1:
        flags += [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}", f"--master-addr={opts.master_addr}",
                  f"--master-port={opts.master_port}"]  # fmt: skip
    return flags


def _quiet_agent() -> None:
    # The agent logs each step of a failure or a shutdown (the signal it got, the ones it sends, each exit code);
    # the launcher says what happened once. Its rendezvous loggers, made later, still warn. The process ends with
    # the launch, so the levels are not set back.
    agent = ("torch.distributed.elastic", "torch.distributed.launcher")
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith(agent) and isinstance(logger, logging.Logger):  # not the placeholders of parent names
            logger.setLevel(logging.CRITICAL)


def _failed(failures: dict[int, Any], cfg: Any, resume: str) -> str:
    """The message of a failed launch: the rank that failed first, with its own error or how it died."""
    from lorakit import checkpoint
    from lorakit.run_folder import RunFolder, latest

    rank, failure = min(failures.items(), key=_cause_first)
    kind, message = _recorded(failure)
    if kind == "error":  # the user's to fix: resuming would only repeat it
        return f"rank {rank} stopped the run: {message}"
    if kind == "peer":  # and no rank here failed by itself: the cause is on another host
        how = "lost its connection to another rank, which stopped first (on another host: see its output)"
    else:
        how = _how(failure.exitcode) + " (its output is above)"
    if latest(RunFolder.of(cfg).checkpoints):
        then = f"Continue from the newest checkpoint with:\n  {resume}"
    else:
        then = f"It has no checkpoint to resume from ({checkpoint.none_yet(cfg)})."
    return f"training stopped: rank {rank} {how}, so the other ranks were stopped. {then}"


def _cause_first(item: tuple[int, Any]) -> tuple:
    # A rank that only lost its peers, or that the agent then stopped (SIGTERM), comes after the one that failed.
    rank, failure = item
    return (_recorded(failure)[0] == "peer", failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)


def _recorded(failure: Any) -> tuple[str | None, str | None]:
    """(kind, message) a rank recorded (`record`), or (None, None)."""
    data = failure.error_file_data.get("message")
    if not isinstance(data, dict):
        return None, None
    return data.get("extraInfo", {}).get("lorakit"), data.get("message")


def _how(exitcode: int) -> str:
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


# ---- in a rank ----
def tie_to_launcher() -> None:
    """In a rank of `lorakit train --nproc`: die with the launcher, even when it is killed (kill -9), and at once
    on its Ctrl-C, which it passes on, as on its SIGTERM: the launcher says what happened, once for all ranks."""
    launcher = os.environ.get(LAUNCHER)
    if not is_rank() or launcher is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        # The kernel kills this process when the thread that started it exits: torchrun's agent starts the ranks
        # from the launcher's main thread.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != int(launcher):  # it died before prctl: this process already has another parent
            os.kill(os.getpid(), signal.SIGKILL)


def quiet_rank() -> bool:
    """Whether this process is a rank that leaves what concerns the whole run (how to resume it) to another:
    every rank of lorakit's launcher, which says it once, and all but the main rank of another launcher."""
    return is_rank() and (LAUNCHER in os.environ or os.environ.get("RANK", "0") != "0")


def lost_peers(e: BaseException) -> bool:
    """Whether `e`, in a rank, is the connection to another rank breaking because that rank's process has gone:
    the effect of its failure, not a cause."""
    return is_rank() and isinstance(e, RuntimeError) and GLOO_PAIR in str(e)


def record(message: str, kind: str) -> bool:
    """In a rank: leave its one-line error where the launcher reads it, torchrun's error file for the rank (which
    a user's own torchrun shows too). kind: "error" (the user's to fix) or "peer" (`lost_peers`).

    Returns whether lorakit's launcher will show it, so that the rank need not.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not is_rank() or not path:
        return False
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time())), "lorakit": kind}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        return False
    return LAUNCHER in os.environ
