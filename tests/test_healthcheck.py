"""The image's HEALTHCHECK (`python -m server.healthcheck`): it probes the port the server process
was started with, read from that process's command line."""
import os
import subprocess
import sys

from conftest import ROOT
from server.healthcheck import health_url, server_argv


def probe(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.healthcheck", str(pid)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_running_server_on_its_own_port_is_healthy(server):
    # the session's server listens on a free port given as --port, not on $SKIPSERVE_PORT
    assert str(server.port) != os.environ.get("SKIPSERVE_PORT", "8000")
    result = probe(server.proc.pid)
    assert result.returncode == 0, result.stderr


def test_a_process_that_is_not_a_server_is_unhealthy():
    result = probe(os.getpid())  # pytest's own command line
    assert result.returncode == 1
    assert "not a skipserve command line" in result.stderr


def test_the_address_comes_from_the_command_line(monkeypatch):
    monkeypatch.setenv("SKIPSERVE_PORT", "8100")
    monkeypatch.setenv("SKIPSERVE_HOST", "0.0.0.0")
    script = ["/usr/local/bin/python", "/usr/local/bin/skipserve"]
    assert health_url(server_argv([*script, "--model", "gemma3-270m"])) == "http://127.0.0.1:8100/health"
    assert health_url(server_argv([*script, "serve", "--port", "9000"])) == "http://127.0.0.1:9000/health"
    assert health_url(server_argv(["python", "-m", "server.cli", "--host=::", "--port=9001"])) == "http://[::1]:9001/health"
    assert health_url(server_argv([*script, "--host", "10.1.2.3"])) == "http://10.1.2.3:8100/health"
    assert health_url(server_argv([*script, "--hostname", "10.1.2.4"])) == "http://10.1.2.4:8100/health"  # TGI's
