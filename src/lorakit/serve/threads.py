"""How many threads torch's CPU work uses in the server: one per core that other processes leave free.

torch splits each op over its intra-op threads (OpenMP) and every op ends at a barrier where they all wait
for the slowest. When another process holds a core, the thread that the kernel put aside holds up every op:
on a 2-core machine two training processes beside `lorakit serve` made it 20x slower (0.046 requests/s
instead of 1.05; `bench/serve_load.py --neighbour` measures it, the README has the figures). With one thread
per free core no op waits for a thread that is not running, and a busy neighbour costs the server only the
core it takes.

`--threads N` fixes the count, as OMP_NUM_THREADS does (set before torch loads: libgomp and MKL read it once).
By default (auto) the engine's thread, which runs every forward, counts before its steps, at most once a
`CHECK_S`, how much of the CPUs other processes used meanwhile (/proc/stat less this process's own CPU time)
and follows: neighbours come and go while a server runs for days. Where there is no /proc/stat (macOS), auto
is every core, as torch's default.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("lorakit.serve")
CHECK_S = 1.0  # how often auto counts the free cores: a few times a step's length, never a step's own cost
BUSY = 0.25  # a core that other processes use more of than this is not free


@dataclass(frozen=True)
class Plan:
    threads: int | None  # torch's intra-op threads to start with; None: torch's own choice (OMP_NUM_THREADS)
    follow_load: bool  # auto: follow the cores that other processes leave free
    env: dict[str, str]  # to set before torch loads


def plan(cores: int, requested: int | None, environ: Mapping[str, str]) -> Plan:
    """The threads for `cores` usable cores: `requested` (--threads), else OMP_NUM_THREADS where the user set it
    (torch reads it: nothing to change), else auto: every core to start with, then as many as are free."""
    if requested is not None:
        return Plan(requested, False, {"OMP_NUM_THREADS": str(requested)})
    if environ.get("OMP_NUM_THREADS"):
        return Plan(None, False, {})
    return Plan(cores, True, {})


def free_threads(cores: int, others_busy: float) -> int:
    """Threads for `cores` usable cores while other processes keep `others_busy` cores busy: the cores they
    leave free (a core counts as free while they use under a quarter of it), at least one."""
    return max(1, min(cores, math.floor(cores - others_busy + BUSY)))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" for no limit
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def busy_s(cpus: set[int], stat: str = "/proc/stat") -> float | None:
    """Seconds that `cpus` spent running anything (all but idle and iowait) since boot; None without /proc/stat."""
    try:
        with open(stat) as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3].isdigit()]
    except OSError:
        return None
    ticks = 0
    for name, *fields in lines:
        if int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            ticks += user + nice + system + irq + softirq + steal  # steal: a hypervisor's other guests
    return ticks / os.sysconf("SC_CLK_TCK")


class Follower:
    """Called by the engine's thread before each step: the first call sets the plan's threads; then with auto,
    every CHECK_S, the cores that other processes left free since the last check. It sets torch's threads in the
    calling thread: OpenMP keeps a thread count per thread, so only the engine's own call reaches its forwards."""

    def __init__(
        self,
        cores: int,
        chosen: Plan,
        busy: Callable[[], float | None] | None = None,
        own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] | None = None,
    ):
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(cores))
        self.cores, self.busy, self.own, self.clock = cores, busy or (lambda: busy_s(cpus)), own, clock
        self.set_threads = set_threads or _set_torch_threads
        self.pending = chosen.threads  # set at the first call, in the engine's thread
        self.threads: int | None = None  # the count set last
        self.others: float | None = None  # the cores other processes kept busy, at the last check
        self.last = self._sample() if chosen.follow_load else None

    def _sample(self) -> tuple[float, float, float] | None:
        busy = self.busy()
        return None if busy is None else (self.clock(), busy, self.own())

    def __call__(self) -> None:
        if self.pending is not None:
            self._set(self.pending)
            self.pending = None
        if self.last is None or self.clock() - self.last[0] < CHECK_S:
            return
        now = self._sample()
        if now is None:
            return
        self.others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / (now[0] - self.last[0])
        self.last = now
        self._set(free_threads(self.cores, self.others))

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            self.set_threads(threads)
            if self.threads is not None:  # a change the operator may wonder about in the step times
                log.info(
                    "torch threads: %d (other processes kept %.2f of %d cores busy)", threads, self.others, self.cores
                )
            self.threads = threads


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


_plan: Plan | None = None  # what `apply` chose for this process


def apply(requested: int | None) -> Plan:
    """Choose the server's threads (--threads, None: auto) and set what must be set before torch loads."""
    global _plan
    _plan = plan(usable_cores(), requested, os.environ)
    os.environ.update(_plan.env)
    return _plan


def follower() -> Follower:
    """The engine's Follower, for the plan `apply` chose (auto where nothing called it)."""
    cores = usable_cores()
    return Follower(cores, _plan or plan(cores, None, os.environ))
