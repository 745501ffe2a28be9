"""`lorakit train --nproc N`: one run on several processes or hosts, started by torchrun.

Each rank runs `python -m lorakit train CONFIG ...` (the same entry point `torchrun -m lorakit` and
`accelerate launch -m lorakit` start), and accelerate picks the backend from the environment torchrun
sets: NCCL between GPUs, gloo between CPU processes. The launcher checks the run folder once, before
any rank starts, and turns a failed rank into one message and the command that resumes the run.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from lorakit.errors import LorakitError


def is_rank() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch) as one rank of a run."""
    return "LOCAL_RANK" in os.environ


def wanted(opts: Any) -> bool:
    """Whether the options ask for a launch (several processes, or several hosts) and this is not a rank."""
    return (bool(opts.nproc) or opts.nnodes > 1) and not is_rank()


def run(config_path: str, overrides: list[str], opts: Any, local: bool) -> int:
    """Start `opts.nproc` ranks on this host (host `opts.node_rank` of `opts.nnodes`) and wait for them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    flags = [
        *(["--local"] if local else []),
        *(["--no-progress"] if opts.no_progress else []),
        *(["--force"] if opts.force else []),
    ]
    rank_argv = ["train", config_path, *overrides, *flags]
    resume = shlex.join(["lorakit", *rank_argv, *_launch_flags(opts), "--resume"])
    args = get_args_parser().parse_args([
        f"--nproc-per-node={opts.nproc or 1}", f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}",
        f"--master-addr={opts.master_addr}", f"--master-port={opts.master_port}", "--module", "lorakit",
        *rank_argv, *(["--resume"] if opts.resume else []), *(["--overwrite"] if opts.overwrite else []),
    ])  # fmt: skip
    try:
        torchrun(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()  # the cause; the agent then stopped the others (SIGTERM)
        raise LorakitError(
            f"training stopped: rank {rank} {_how(first.exitcode)} (its output is above), so the other ranks were "
            "stopped. "
            f"Continue from the newest checkpoint with:\n  {resume}"
        ) from None
    return 0


def _launch_flags(opts: Any) -> list[str]:
    flags = [f"--nproc={opts.nproc or 1}"]
    if opts.nnodes > 1:
        flags += [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}", f"--master-addr={opts.master_addr}",
                  f"--master-port={opts.master_port}"]  # fmt: skip
    return flags


def _how(exitcode: int) -> str:
    if exitcode < 0:
        import signal

        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"
