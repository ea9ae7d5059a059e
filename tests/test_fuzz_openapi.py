"""Schemathesis against the server's own OpenAPI spec: generated and mutated requests to every
/v1 route and TGI's /generate never get a 5xx and never hang (a small context window bounds each
generation)."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import ServerProcess


@pytest.fixture(scope="module")
def fuzz_server():
    srv = ServerProcess("--max-model-len", "64", "--max-batch", "4", "--max-waiting", "8")
    yield srv
    srv.stop()


def test_v1_routes_never_answer_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.include(path_regex="^/(v1/|generate$)").get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/generate"}
    seen = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.body, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert sum(seen.values()) >= 30 and any(code < 300 for code in seen)
