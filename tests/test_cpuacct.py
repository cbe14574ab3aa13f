"""client/cpuacct.py: CPU seconds of process trees from /proc, checked against the processes' own accounts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from client.cpuacct import CLK_TCK, CpuMeter, descendants, parse_stat

# a child that spins for ~0.3 s of CPU when told to, then reports its own os.times() delta
SPINNER = textwrap.dedent(
    """
    import os, sys, time
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = os.times()
    while time.process_time() < t0.user + t0.system + 0.3:
        pass
    t1 = os.times()
    print(f"{(t1.user + t1.system) - (t0.user + t0.system):.4f}", flush=True)
    sys.stdin.readline()
    """
)


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    # a command name with spaces and ')' inside, as /proc shows it
    line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 1000 0 0 0 123 45 6 7 20 0 3 0 998877 1000000 100 18446744073709551615"
    assert parse_stat(line) == (17, 168, 13, 998877)


def test_parse_stat_of_this_process_agrees_with_os_times() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        ppid, own, _, _ = parse_stat(f.read())
    t = os.times()
    assert ppid == os.getppid()
    assert abs(own / CLK_TCK - (t.user + t.system)) <= 3 / CLK_TCK + 0.05


def _spinner() -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout and p.stdout.readline().strip() == "ready"
    return p


def test_meter_matches_the_process_own_cpu_account() -> None:
    p = _spinner()
    idle = _spinner()  # a second name that does nothing in the window
    try:
        m = CpuMeter({"spin": p.pid, "idle": idle.pid}).start()
        assert p.stdin and p.stdout
        p.stdin.write("go\n")
        p.stdin.flush()
        own = float(p.stdout.readline())
        used = m.stop()
        assert set(used) == {"spin", "idle"}
        assert own >= 0.25  # os.times() counts in clock ticks
        # the meter sees what the child counted itself, give or take a few clock ticks (the
        # reads and writes around the spin) and never less
        assert own - 2 / CLK_TCK <= used["spin"] <= own + 0.05
        assert used["idle"] <= 0.02
    finally:
        for q in (p, idle):
            q.kill()
            q.wait()


def test_meter_counts_a_child_process_under_its_parent_name() -> None:
    # a shell whose child spins: the child's time is counted under the shell's name
    import shlex

    parent = subprocess.Popen(["/bin/sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(SPINNER)}; true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout and parent.stdin and parent.stdout.readline().strip() == "ready"
        assert len(descendants(parent.pid)) == 1
        m = CpuMeter({"sh": parent.pid}).start()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        own = float(parent.stdout.readline())
        used = m.stop()
        assert own >= 0.25
        assert own - 2 / CLK_TCK <= used["sh"] <= own + 0.05
    finally:
        kids = descendants(parent.pid)
        for k in kids:
            os.kill(k, 9)
        parent.kill()
        parent.wait()
