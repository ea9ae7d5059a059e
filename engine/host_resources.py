"""What of this host the process may use: CPU time (a CFS quota) and memory (a memory limit).

A container sees the host's CPUs and the host's /proc/meminfo, not its own limits: `docker run
--cpus 4 --memory 8g` or compose's `deploy.resources.limits` on a 64-core, 256 GiB host leaves the
affinity mask whole and MemAvailable at the host's. The limits live in the process's cgroups (v2's
unified tree, or v1's per-controller trees), along its own cgroup path up to the root: each
ancestor's limit applies to everything under it, so the smallest wins.

- CPU: v2's cpu.max or v1's cfs files, in CPUs' worth of time (threads.py rounds it down).
- Memory: v2's memory.max or v1's memory.limit_in_bytes, less what the cgroup holds now, where page
  cache that no process maps counts as free (the kernel reclaims it before the OOM killer acts, as
  MemAvailable counts it); the smaller of that and MemAvailable.
"""
from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
# v1 writes "no limit" as LONG_MAX rounded down to a page (9223372036854771712)
V1_UNLIMITED = 1 << 62


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(path: Path) -> dict[str, int]:
    """A memory.stat file as {key: value}; empty when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stat[parts[0]] = int(parts[1])
    return stat


def _own_cgroups(proc_cgroup: Path, controller: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 path of `controller`) of this process, from /proc/self/cgroup."""
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
        elif controller in controllers.split(","):
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


def _v2_cpu(path: Path) -> float | None:
    try:
        quota, period = (path / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_cpu(path: Path) -> float | None:
    quota, period = _read_int(path / "cpu.cfs_quota_us"), _read_int(path / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs' worth of time this process may use, or None when no quota applies."""
    v2, v1 = _own_cgroups(proc_cgroup, "cpu")
    limits = [lim for p in _ancestors(root, v2) if (lim := _v2_cpu(p)) is not None]
    for base in (root / "cpu", root / "cpu,cpuacct"):
        limits += [lim for p in _ancestors(base, v1) if (lim := _v1_cpu(p)) is not None]
    return min(limits) if limits else None


def _headroom(limit: int, usage: int | None, unmapped_cache: int) -> int:
    return max(0, limit - (usage or 0) + max(0, unmapped_cache))


def _v2_memory(path: Path) -> int | None:
    try:
        text = (path / "memory.max").read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    stat = _stat(path / "memory.stat")
    # "file" holds shmem (tmpfs), which no reclaim frees
    cache = stat.get("file", 0) - stat.get("file_mapped", 0) - stat.get("shmem", 0)
    return _headroom(int(text), _read_int(path / "memory.current"), cache)


def _v1_memory(path: Path) -> int | None:
    limit = _read_int(path / "memory.limit_in_bytes")
    if limit is None or limit >= V1_UNLIMITED:
        return None
    stat = _stat(path / "memory.stat")
    cache = stat.get("total_cache", stat.get("cache", 0)) - stat.get("total_mapped_file", stat.get(
        "mapped_file", 0)) - stat.get("total_shmem", stat.get("shmem", 0))
    return _headroom(limit, _read_int(path / "memory.usage_in_bytes"), cache)


def cgroup_memory_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes this process may still take before its cgroups' memory limits, or None when none applies."""
    v2, v1 = _own_cgroups(proc_cgroup, "memory")
    room = [r for p in _ancestors(root, v2) if (r := _v2_memory(p)) is not None]
    room += [r for p in _ancestors(root / "memory", v1) if (r := _v1_memory(p)) is not None]
    return min(room) if room else None


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                     meminfo: Path = MEMINFO) -> int | None:
    """Bytes this process may still allocate: the host's MemAvailable, capped by its cgroups' memory
    limits; None where neither is known."""
    known = [m for m in (meminfo_available(meminfo), cgroup_memory_headroom(root, proc_cgroup)) if m is not None]
    return min(known) if known else None
