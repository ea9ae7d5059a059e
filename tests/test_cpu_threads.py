"""The CPU thread default: capped at a container's CPU quota (cgroup v1 and v2 trees written here
as the kernel lays them out), never raised above the affinity mask's count."""
import subprocess
import sys

from engine.backends.cpu.threads import default_threads
from engine.host_resources import cgroup_cpu_limit
from tests.helpers import cgroup_tree


def test_v2_container_root(tmp_path):
    # inside a container the namespace's root is the container's cgroup: `docker run --cpus 2.5`
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "250000 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert default_threads(64, 2.5) == 2
    assert default_threads(1, 2.5) == 1  # never above the affinity mask's count


def test_v2_nested_smallest_wins(tmp_path):
    root, proc = cgroup_tree(tmp_path, {
        "cpu.max": "max 100000\n",
        "system.slice/cpu.max": "400000 100000\n",
        "system.slice/skipserve.service/cpu.max": "max 100000\n",
    }, "0::/system.slice/skipserve.service\n")
    assert cgroup_cpu_limit(root, proc) == 4.0


def test_v2_no_quota(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert default_threads(16, None) == 16


def test_v1_cfs_quota(tmp_path):
    root, proc = cgroup_tree(tmp_path, {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    }, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert default_threads(8, 1.5) == 1
    assert default_threads(8, 4.0) == 4


def test_missing_files_mean_no_limit(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "garbage"}, "not a cgroup line\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent") is None
    assert default_threads(4, 0.2) == 1  # a fraction of a CPU still gets one thread


def test_explicit_and_environment_win():
    code = ("import torch; from engine.backends.cpu.threads import configure_threads;"
            "print(configure_threads(None), configure_threads(1), torch.get_num_threads())")
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout
    assert "(1, 'OMP_NUM_THREADS') (1, '--threads') 1" in env_out
