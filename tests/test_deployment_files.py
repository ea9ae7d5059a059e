"""The Dockerfile's and the compose files' server commands are ones the server takes, and
Prometheus scrapes the port the image listens on."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from server.cli import build_config, serve_parser
from tests.conftest import ROOT


def dockerfile() -> dict[str, str]:
    """The Dockerfile's instructions (continued lines joined), by keyword; ENV's as one string."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found[keyword] = f"{found[keyword]} {rest}" if keyword in found else rest
    return found


def image_env() -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(dockerfile()["ENV"]))


def compose(name: str) -> dict:
    return yaml.safe_load((ROOT / "docker" / name).read_text())


@pytest.mark.parametrize("argv", [
    json.loads(dockerfile()["CMD"]),
    compose("docker-compose.gpu.yml")["services"]["skipserve"]["command"],
], ids=["image", "cuda-override"])
def test_the_server_commands_parse_and_build_a_config(argv, monkeypatch):
    for name, value in image_env().items():
        monkeypatch.setenv(name, value)
    assert json.loads(dockerfile()["ENTRYPOINT"]) == ["skipserve"]
    config = build_config(serve_parser().parse_args(argv))
    assert config.max_model_len > 0


def test_prometheus_scrapes_the_port_the_image_listens_on():
    env = image_env()
    assert env["SKIPSERVE_HOST"] == "0.0.0.0"
    assert dockerfile()["EXPOSE"] == env["SKIPSERVE_PORT"]
    service = compose("docker-compose.yml")["services"]["skipserve"]
    assert [p.rsplit(":", 1)[1] for p in service["ports"]] == [env["SKIPSERVE_PORT"]]
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"skipserve:{env['SKIPSERVE_PORT']}"]


def test_compose_mounts_the_alert_rules_beside_the_prometheus_config_and_pins_its_images():
    """prometheus.yml names its rule files relative to itself (/etc/prometheus in the container),
    so each must be mounted there; the images are pinned to a version, not `latest`."""
    services = compose("docker-compose.yml")["services"]
    mounts = dict(v.removesuffix(":ro").split(":") for v in services["prometheus"]["volumes"])
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"]
    for name in config["rule_files"]:
        assert mounts[f"./prometheus/{name}"] == f"/etc/prometheus/{name}"
        assert (ROOT / "docker" / "prometheus" / name).is_file()
    for service in ("prometheus", "grafana"):
        image, _, tag = services[service]["image"].partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), services[service]["image"]
