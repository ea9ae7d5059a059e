"""Monitoring as deployed: the real Prometheus scraping a real server, and the Grafana dashboard's
queries checked against what the server really exports."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.conftest import ROOT, ServerProcess, cuda_available, free_port

MODEL = "smollm2-135m-instruct"
DASHBOARD = ROOT / "docker/grafana/dashboards/skipserve.json"
DATASOURCE = ROOT / "docker/grafana/provisioning/datasources/prometheus.yml"
ALERTS = ROOT / "docker/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "docker/prometheus/alerts_test.yml"


def exported_names(server) -> set[str]:
    text = httpx.get(server.url + "/metrics").text
    return {re.split(r"[{ ]", line, 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def dashboard_exprs() -> list[str]:
    """The panels' queries as Grafana sends them at the datasource's 5 s scrape interval (a range over
    `$__interval`, one scrape wide at the default time range, would hold too few samples for `rate`
    or `increase`, unless its panel sets an interval of four scrapes: `$__rate_interval` is at least that)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert not [t["expr"] for p in panels for t in p["targets"] if "[$__interval]" in t["expr"] and p.get("interval") != "20s"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    return [e.replace("$__rate_interval", "20s").replace("$__interval", "15s") for e in exprs]


def test_every_dashboard_query_names_an_exported_metric(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    names = exported_names(server)
    used = {m for e in dashboard_exprs() for m in re.findall(r"skipserve:[a-zA-Z0-9_:]+", e)}
    assert len(used) >= 10
    assert sorted(used - names) == []


def test_metrics_report_the_process_memory_and_the_kv_cache(server):
    """`skipserve:kv_cache_bytes` is the cache the server's layout implies: on the CPU the preset's
    max_num_seqs x max_model_len tokens, fp16 for its quantized weights or fp32, held in the
    process's resident memory (`process_resident_memory_bytes`: allocated and zeroed at load);
    on CUDA (sized from the card's memory, bf16) a whole number of blocks, in GPU memory."""
    from engine.config import ModelConfig
    from engine.loader import ensure_hf_dir
    from server.config_file import load_config, preset_path

    kv = server.metric("kv_cache_bytes")
    preset, model = load_config(preset_path(MODEL)), ModelConfig.from_hf_dir(ensure_hf_dir(MODEL, dense=False))
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim  # K and V elements
    if cuda_available():  # the preset's device auto serves on the GPU
        block = preset.block_size * per_token * 2
        assert kv > 0 and kv % block == 0
        return
    tokens = preset.max_num_seqs * preset.max_model_len  # the CPU's default capacity (a whole number of blocks)
    assert kv in (tokens * per_token * 2, tokens * per_token * 4)  # fp16 (quantized weights) or fp32
    rss = next(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("process_resident_memory_bytes "))
    assert rss > kv


def test_dashboard_is_grafana_json_wired_to_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["type"] in {"timeseries", "heatmap", "stat", "gauge", "bargauge"}
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["uid"] == uid and p["targets"]
        assert all(t["datasource"]["uid"] == uid and t["expr"] for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("skip rate per layer", "skip ratio", "throughput", "first token", "inter-token", "kv cache"):
        assert needed in titles


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: scripts/setup.sh installs Debian's prometheus package"
    return path


def test_promtool_accepts_the_compose_prometheus_config():
    r = subprocess.run([promtool(), "check", "config", str(ROOT / "docker/prometheus/prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def running_prometheus(config: dict, tmp_path):
    """Debian's real Prometheus on a free port, with `config`; -> its URL once it is ready."""
    promtool()
    port = free_port()
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={path}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prometheus(server, tmp_path):
    host_port = server.url.removeprefix("http://")
    with running_prometheus({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "skipserve", "static_configs": [{"targets": [host_port]}]}]}, tmp_path) as url:
        yield url


def query(prom: str, expr: str) -> float:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}).json()
    assert r["status"] == "success", r
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else float("nan")


def scraped_counts(prom: str, server) -> tuple[float, float]:
    """Wait until Prometheus has scraped the server's current counters; -> (skipped, total) FFN blocks."""
    want = server.metric("generation_tokens_total")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if query(prom, "sum(skipserve:generation_tokens_total)") == want:
            return (query(prom, "sum(skipserve:ffn_blocks_skipped_total)"),
                    query(prom, "sum(skipserve:ffn_blocks_total)"))
        time.sleep(0.5)
    raise AssertionError("Prometheus never scraped the latest counters")


def test_every_dashboard_query_runs_on_prometheus(prometheus):
    """Each panel's PromQL parses and evaluates on the real Prometheus (a ratio over no traffic is
    no data, a gap, rather than a 0% clamped out of a zero denominator)."""
    for expr in dashboard_exprs():
        r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}).json()
        assert r["status"] == "success", (expr, r)


def test_prometheus_reads_zero_skip_for_dense_and_nonzero_for_skipping(prometheus, server, client):
    msg = [{"role": "user", "content": "Describe a sunset."}]
    before = scraped_counts(prometheus, server)
    client.chat.completions.create(model=MODEL, messages=msg, max_tokens=12, temperature=0)
    after_dense = scraped_counts(prometheus, server)
    client.chat.completions.create(model=MODEL, messages=msg, max_tokens=12, temperature=0,
                                   extra_body={"ffn_skip": {"budget": 0.3, "threshold": 0.9, "warmup_tokens": 0}})
    after_skip = scraped_counts(prometheus, server)
    dense_rate = (after_dense[0] - before[0]) / (after_dense[1] - before[1])
    skip_rate = (after_skip[0] - after_dense[0]) / (after_skip[1] - after_dense[1])
    assert dense_rate == 0.0
    assert 0.0 < skip_rate <= 0.3


def test_a_fresh_server_exports_every_finish_reason_at_zero():
    """Each `request_success_total{finished_reason}` is there at 0 before the first request ends so:
    `increase` (the dashboard, SkipserveServerErrors) sees the first error, which a series born at 1
    would hide."""
    srv = ServerProcess("--max-model-len", "256")
    try:
        assert {r: srv.metric("request_success_total", f'{{finished_reason="{r}"}}')
                for r in ("stop", "length", "abort", "error")} == dict.fromkeys(("stop", "length", "abort", "error"), 0.0)
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                          "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert srv.metric("request_success_total", '{finished_reason="length"}') == 1.0
    finally:
        srv.stop()


def alert_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_passes_the_alert_rules_and_their_unit_tests():
    """`promtool test rules` on docker/prometheus/alerts_test.yml, which holds, for every alert, a
    made-up series it fires on and a time or series it stays quiet at."""
    r = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert sorted(fired) == sorted(quiet) == sorted(alert_names())
    r = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_alert_rules_run_on_prometheus_and_a_dead_target_goes_pending(server, tmp_path):
    """The compose file's rules on the real Prometheus, scraping the real server and a port nothing
    listens on: every rule evaluates without error, and SkipserveDown is pending (its `for` is a
    minute) for the dead target alone."""
    dead = f"127.0.0.1:{free_port()}"
    live = server.url.removeprefix("http://")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "skipserve", "static_configs": [{"targets": [live, dead]}]}]}
    with running_prometheus(config, tmp_path) as prom:
        deadline = time.monotonic() + 30
        while True:
            groups = httpx.get(prom + "/api/v1/rules").json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            alerts = httpx.get(prom + "/api/v1/alerts").json()["data"]["alerts"]
            if alerts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(rule["name"] for rule in rules) == sorted(alert_names())
        assert [(rule["name"], rule["lastError"]) for rule in rules if rule["health"] != "ok"] == []
        assert [(a["labels"]["alertname"], a["labels"]["instance"], a["state"]) for a in alerts] == \
            [("SkipserveDown", dead, "pending")]
