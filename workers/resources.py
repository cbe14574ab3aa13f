"""The worker's memory readings: its RSS, its limit (WORKER_MAX_MEMORY_MB or its cgroup's), its GPU memory."""

from __future__ import annotations

import os
import sys

from workers.device import Device


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_limit_bytes(max_memory_mb: int) -> float:
    """The memory this worker may use: the smaller of WORKER_MAX_MEMORY_MB (where it exits to be
    restarted) and its cgroup's limit (a container's, where the kernel kills it); 0 = none."""
    limits = [max_memory_mb * 1e6] if max_memory_mb else []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            v = open(path).read().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 1 << 60:  # "max" (v2) or a huge number (v1): no limit
            limits.append(float(v))
        break
    return min(limits, default=0.0)


def gpu_memory_mb(device: Device) -> float:
    if device.kind != "cuda" or "torch" not in sys.modules:
        return 0.0
    import torch

    try:
        return round(torch.cuda.memory_allocated(0) / 1e6, 1)
    except Exception:  # noqa: BLE001
        return 0.0
