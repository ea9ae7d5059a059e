"""uvicorn's access log without query strings: a client may put a secret there (an API key sent
as `?api_key=...`), and query strings mean nothing to these routes. Nor does it log answered
probes: Docker's health check every 10 s and Prometheus's scrape every 5 s made ~26,000 lines a
day of a compose deployment's log; a probe that fails is still logged."""
from __future__ import annotations

import logging


class DropQueryStrings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client address, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?<redacted>", args[3], args[4])
        return True


PROBES = frozenset({"/health", "/metrics"})


class DropAnsweredProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and isinstance(args[4], int):
            return not (args[2].split("?", 1)[0] in PROBES and args[4] < 400)
        return True


def install() -> None:
    access = logging.getLogger("uvicorn.access")
    access.addFilter(DropQueryStrings())
    access.addFilter(DropAnsweredProbes())
