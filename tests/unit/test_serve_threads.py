"""The server's torch threads: one per core that other processes leave free (serve/threads.py).

A busy neighbour on a 2-core machine made `lorakit serve` 20x slower: every op waited at OpenMP's barrier for
the thread the neighbour displaced. The choice is tested as pure functions (cores, --threads, what others use),
the follower with a scripted clock and CPU counters, and the engine and the serve entry for real: the engine's
forwards run with the chosen count, and `lorakit serve --threads N` sets OMP_NUM_THREADS before torch loads.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap

import pytest
import torch

from lorakit.serve import threads
from lorakit.serve.engine import Engine, Job
from tiny import tiny_model, tiny_tokenizer


def test_the_plan_is_threads_asked_else_the_users_omp_setting_else_auto():
    assert threads.plan(2, None, {}) == threads.Plan(2, True, {})  # auto: every core to start with
    # --threads: fixed, and in the environment before torch loads, so libgomp and MKL start with it too.
    assert threads.plan(2, 1, {}) == threads.Plan(1, False, {"OMP_NUM_THREADS": "1"})
    assert threads.plan(2, 4, {"OMP_NUM_THREADS": "1"}) == threads.Plan(4, False, {"OMP_NUM_THREADS": "4"})
    assert threads.plan(8, None, {"OMP_NUM_THREADS": "3"}) == threads.Plan(None, False, {})  # torch reads it


@pytest.mark.parametrize(
    ("cores", "others", "want"),
    [
        (2, 0.0, 2),  # alone
        (2, 0.2, 2),  # a little background work leaves the core free
        (2, 0.67, 1),  # one busy loop beside this server's 2 threads gets 2/3 of a core: it wants a whole one
        (2, 1.0, 1),
        (2, 3.5, 1),  # never none
        (16, 3.0, 13),
        (16, 3.3, 12),  # a core that others use 30% of is not free
    ],
)
def test_threads_are_the_cores_others_leave_free(cores, others, want):
    assert threads.free_threads(cores, others) == want


class Machine:
    """A scripted clock and CPU counters: `run(seconds, others)` advances time, with this process using what
    its threads use and other processes `others` cores."""

    def __init__(self, own_cores: float):
        self.now, self.busy, self.own, self.own_cores = 100.0, 5000.0, 3.0, own_cores

    def run(self, seconds: float, others: float) -> None:
        self.now += seconds
        self.own += seconds * self.own_cores
        self.busy += seconds * (self.own_cores + others)


def follower(machine: Machine, plan: threads.Plan, cores: int = 2) -> tuple[threads.Follower, list[int]]:
    calls: list[int] = []
    f = threads.Follower(cores, plan, busy=lambda: machine.busy, own=lambda: machine.own,
                         clock=lambda: machine.now, set_threads=calls.append)  # fmt: skip
    return f, calls


def test_auto_follows_neighbours_as_they_come_and_go_checking_once_a_period():
    m = Machine(own_cores=2.0)
    f, calls = follower(m, threads.plan(2, None, {}))
    f()
    assert calls == [2]  # the first step sets the plan's start
    m.run(threads.CHECK_S / 2, others=1.0)
    f()
    assert calls == [2]  # not checked again within CHECK_S
    m.run(threads.CHECK_S, others=0.67)  # a neighbour starts: it gets 2/3 of a core beside 2 threads
    f()
    assert calls == [2, 1]
    m.own_cores = 1.0
    m.run(threads.CHECK_S, others=1.0)
    f()
    assert calls == [2, 1]  # it stays: unchanged counts are not set again
    m.run(threads.CHECK_S, others=0.05)  # it left
    f()
    assert calls == [2, 1, 2]


def test_a_fixed_count_is_set_once_and_the_cpus_never_read():
    def unread() -> float:
        raise AssertionError("a fixed count reads no counters")

    f = threads.Follower(2, threads.plan(2, 3, {}), busy=unread, set_threads=(calls := []).append)
    for _ in range(3):
        f()
    assert calls == [3]
    g = threads.Follower(2, threads.plan(2, None, {"OMP_NUM_THREADS": "1"}), busy=unread, set_threads=calls.append)
    g()
    assert calls == [3]  # the user's OMP_NUM_THREADS: torch's own choice stands


def test_without_cpu_counters_auto_keeps_every_core():
    clock = iter(range(0, 100, 5))
    f = threads.Follower(4, threads.plan(4, None, {}), busy=lambda: None, clock=lambda: next(clock),
                         set_threads=(calls := []).append)  # fmt: skip
    for _ in range(3):
        f()
    assert calls == [4]


def test_busy_time_is_read_for_the_given_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        "cpu  400 0 40 9000 90 0 0 0 0 0\n"
        "cpu0 100 5 20 1000 50 1 2 3 7 0\n"
        "cpu1 300 0 20 8000 40 0 0 0 0 0\n"
        "intr 12345\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    assert threads.busy_s({0}, str(stat)) == pytest.approx(131 / tick)  # idle and iowait out; guest is in user
    assert threads.busy_s({0, 1}, str(stat)) == pytest.approx(451 / tick)
    assert threads.busy_s({0}, str(tmp_path / "absent")) is None


def test_the_engine_runs_its_forwards_with_the_chosen_threads_and_leaves_other_threads_alone(monkeypatch):
    before = torch.get_num_threads()
    want = before + 1  # differs from what any thread here has
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # restored after the test: apply sets it
    monkeypatch.setattr(threads, "_plan", None)
    threads.apply(want)
    tok = tiny_tokenizer()
    net = tiny_model("llama", tok)
    engine = Engine(lambda: net, tok, [tok.eos_token_id])
    seen: queue.Queue = queue.Queue()  # the last emit runs in the engine's thread, after its last forward
    job = Job(
        tok("hi")["input_ids"],
        None,
        2,
        stop_ids=frozenset(),
        emit=lambda t, done, why: done and seen.put(torch.get_num_threads()),
    )
    try:
        engine.submit(job)
        count = seen.get(timeout=60)
        here = torch.get_num_threads()  # this thread's own count
    finally:
        engine.close()
        torch.set_num_threads(before)  # torch keeps the last count for threads that start later
    assert count == want
    assert here == before
    assert job.finish_reason == "length"


def test_serve_sets_the_threads_before_torch_loads():
    # A process of its own: torch is loaded in this one, and libgomp reads OMP_NUM_THREADS once, when it loads.
    # One thread: torch's default where the machine has more cores (MKL caps a larger count at the cores).
    script = textwrap.dedent(
        """
        import os, sys, threading
        from lorakit import cli
        from lorakit.serve import server

        def build(opts):  # where the server loads torch: report what it finds, then stop
            loaded = "torch" in sys.modules
            import torch
            fresh = []  # a thread that never ran torch: torch's default count there
            t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
            t.start(); t.join()
            print(loaded, os.environ.get("OMP_NUM_THREADS"), fresh[0])
            sys.exit(0)

        server.build, server.listen = build, lambda host, port: None  # no port taken
        sys.exit(cli.main(["serve", "--model", "unused", "--threads", "1"]))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "1", "1"]
