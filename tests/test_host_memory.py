"""The memory a CPU load may take: the host's MemAvailable capped by a container's memory limit less
its use (cgroup v1 and v2 trees written here as the kernel lays them out); page cache that nothing
maps counts as free, as the kernel reclaims it before the OOM killer acts."""
from engine.host_resources import available_memory, cgroup_memory_headroom
from tests.helpers import cgroup_tree

GiB = 2**30
HOST = f"MemTotal:       263000000 kB\nMemFree:        1000 kB\nMemAvailable:   {200 * GiB // 1024} kB\n"


def _tree(base, files: dict[str, str], proc: str, meminfo: str = HOST):
    root, proc_file = cgroup_tree(base, files, proc)
    (base / "meminfo").write_text(meminfo)
    return root, proc_file, base / "meminfo"


def test_v2_container_limit_caps_the_hosts_memavailable(tmp_path):
    # `docker run --memory 8g` on a host with 200 GiB available: 5 GiB charged, of which 2 GiB page
    # cache, 0.5 GiB of it mapped (the weights' file) and 0.25 GiB tmpfs
    root, proc, meminfo = _tree(tmp_path, {
        "memory.max": f"{8 * GiB}\n", "memory.current": f"{5 * GiB}\n",
        "memory.stat": f"anon {3 * GiB}\nfile {2 * GiB}\nfile_mapped {GiB // 2}\nshmem {GiB // 4}\n",
    }, "0::/\n")
    assert cgroup_memory_headroom(root, proc) == 8 * GiB - 5 * GiB + (2 * GiB - GiB // 2 - GiB // 4)
    assert available_memory(root, proc, meminfo) == 4 * GiB + GiB // 4


def test_v2_nested_smallest_wins_and_no_limit_reads_the_host(tmp_path):
    root, proc, meminfo = _tree(tmp_path, {
        "memory.max": "max\n",
        "system.slice/memory.max": f"{16 * GiB}\n", "system.slice/memory.current": f"{15 * GiB}\n",
        "system.slice/skipserve.service/memory.max": f"{12 * GiB}\n",
        "system.slice/skipserve.service/memory.current": f"{2 * GiB}\n",
    }, "0::/system.slice/skipserve.service\n")
    assert cgroup_memory_headroom(root, proc) == GiB  # the slice's: its other services hold 13 GiB
    root, proc, meminfo = _tree(tmp_path / "open", {"memory.max": "max\n", "memory.current": "5\n"}, "0::/\n")
    assert cgroup_memory_headroom(root, proc) is None
    assert available_memory(root, proc, meminfo) == 200 * GiB


def test_v1_limit_and_unlimited_ancestors(tmp_path):
    unlimited = "9223372036854771712\n"  # LONG_MAX rounded down to a page: v1's "no limit"
    root, proc, meminfo = _tree(tmp_path, {
        "memory/memory.limit_in_bytes": unlimited, "memory/memory.usage_in_bytes": f"{100 * GiB}\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{6 * GiB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{4 * GiB}\n",
        "memory/docker/abc/memory.stat": f"cache {GiB}\nmapped_file {GiB // 2}\nshmem 0\n"
                                         f"total_cache {GiB}\ntotal_mapped_file {GiB // 2}\ntotal_shmem 0\n",
    }, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_memory_headroom(root, proc) == 2 * GiB + GiB // 2
    root, proc, _ = _tree(tmp_path / "open", {"memory/memory.limit_in_bytes": unlimited}, "12:memory:/\n")
    assert cgroup_memory_headroom(root, proc) is None


def test_over_the_limit_is_none_left_and_garbage_is_no_limit(tmp_path):
    root, proc, meminfo = _tree(tmp_path, {"memory.max": f"{GiB}\n", "memory.current": f"{2 * GiB}\n"}, "0::/\n")
    assert available_memory(root, proc, meminfo) == 0
    root, proc, meminfo = _tree(tmp_path / "bad", {"memory.max": "garbage", "memory.stat": "file x\n"},
                                "not a cgroup line\n", meminfo="nothing here\n")
    assert available_memory(root, proc, meminfo) is None
    absent = tmp_path / "absent"
    assert available_memory(absent, absent, absent) is None

