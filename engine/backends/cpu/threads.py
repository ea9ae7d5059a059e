"""How many threads the CPU kernels use by default: no more than the CPUs the process may run on.

OpenMP (torch's threads, and so skipserve's kernels, which take torch.get_num_threads()) counts the
CPUs in the process's affinity mask, but not a CFS quota: `docker run --cpus 4` or compose's
`deploy.resources.limits.cpus` on a 64-core host leaves the mask whole, and 64 spinning threads
then share 4 CPUs' worth of time, each step waiting on the slowest of them (several times slower
than 4 threads). The quota (engine/host_resources.py: cgroup v2's cpu.max or v1's cfs files, the
smallest along the process's own cgroup path) is rounded down (as Go's automaxprocs: a thread more
than the quota holds is throttled at every period, and the others wait on it), at least one.
"""
from __future__ import annotations

import math
import os

from engine.host_resources import cgroup_cpu_limit


def default_threads(current: int, limit: float | None) -> int:
    """`current` (OpenMP's count from the affinity mask) capped at the quota, at least one."""
    if limit is None:
        return current
    return max(1, min(current, math.floor(limit + 1e-6)))


def configure_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads; returns (threads, where the number came from)."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    current = torch.get_num_threads()
    limit = cgroup_cpu_limit()
    threads = default_threads(current, limit)
    if threads != current:
        torch.set_num_threads(threads)
        cpus = f"{limit:g} CPU" + ("" if limit == 1 else "s")
        return threads, f"the cgroup's CPU quota of {cpus}; {current} in the affinity mask"
    return threads, "the CPUs in the affinity mask"
