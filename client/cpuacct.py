"""CPU time spent by a set of processes, read from /proc/<pid>/stat (utime + stime).

`trifecta bench` reports the CPU one image costs the service (API + worker + Redis) and the
one-process script it is compared with:

    meter = CpuMeter({"api": api_pid, "worker": worker_pid, "redis": redis_pid})
    meter.start(); ...saturated run...; used = meter.stop()   # {"api": s, "worker": s, "redis": s}

Each name counts its process and the descendants alive at either reading (a prefork child,
uvicorn's workers). A descendant that exits between the two readings takes its time with it
unless its parent waited for it (then it is in the parent's cutime, which is added too).
psutil would do the same; this is 40 lines over a file format that has not changed in decades.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, int, int, int]:
    """(ppid, utime + stime, cutime + cstime, starttime) in clock ticks from one /proc/<pid>/stat line.

    The command name (field 2) is in parentheses and may itself hold spaces and ')': the
    fields are counted from the LAST ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3]
    ppid = int(rest[1])
    own = int(rest[11]) + int(rest[12])  # utime (14), stime (15)
    children = int(rest[13]) + int(rest[14])  # cutime (16), cstime (17): waited-for children
    return ppid, own, children, int(rest[19])  # starttime (22)


def _read(pid: int) -> tuple[int, int, int, int] | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... alive now (one scan of /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _read(int(d))
            if st:
                kids.setdefault(st[0], []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_ticks(pid: int) -> dict[tuple[int, int], int]:
    """{(pid, starttime): own + waited-children ticks} for pid and its live descendants
    (starttime tells a reused pid from the process that had it before)."""
    out = {}
    for p in [pid, *descendants(pid)]:
        st = _read(p)
        if st:
            out[(p, st[3])] = st[1] + st[2]
    return out


class CpuMeter:
    """CPU seconds used by named process trees between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0: dict[str, dict[tuple[int, int], int]] = {}

    def start(self) -> CpuMeter:
        self._t0 = {name: tree_ticks(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        used = {}
        for name, pid in self.pids.items():
            t1 = tree_ticks(pid)
            before = self._t0.get(name, {})
            # a process first seen now counts from 0: all its time fell inside the window
            # (it started after start(), or it was missed then, which overcounts by its startup)
            used[name] = sum(v - before.get(k, 0) for k, v in t1.items()) / CLK_TCK
        return used
