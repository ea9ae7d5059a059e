"""How many threads the CPU kernels use by default: no more than the CPUs the process may run on.

OpenMP (torch's threads, and so skipserve's kernels, which take torch.get_num_threads()) counts the
CPUs in the process's affinity mask, but not a CFS quota: `docker run --cpus 4` or compose's
`deploy.resources.limits.cpus` on a 64-core host leaves the mask whole, and 64 spinning threads
then share 4 CPUs' worth of time, each step waiting on the slowest of them (several times slower
than 4 threads). The quota is read from cgroup v2's cpu.max or v1's cfs files, along the process's
own cgroup path up to the root; the smallest limit wins, rounded down (as Go's automaxprocs: a
thread more than the quota holds is throttled at every period, and the others wait on it), at least
one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = (path / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(path: Path) -> float | None:
    try:
        quota = int((path / "cpu.cfs_quota_us").read_text())
        period = int((path / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, own: str | None) -> list[Path]:
    """base/own, its parents, and base itself (inside a container the namespace's root is its own
    cgroup, and `own` reads "/")."""
    paths = [base]
    if own:
        node = base
        for part in Path(own.lstrip("/")).parts:
            node = node / part
            paths.append(node)
    return paths


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs' worth of time this process may use, or None when no quota applies."""
    v2, v1 = _own_cgroups(proc_cgroup)
    limits = [lim for p in _ancestors(root, v2) if (lim := _v2_limit(p)) is not None]
    for base in (root / "cpu", root / "cpu,cpuacct"):
        limits += [lim for p in _ancestors(base, v1) if (lim := _v1_limit(p)) is not None]
    return min(limits) if limits else None


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
