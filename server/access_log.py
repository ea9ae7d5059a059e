"""uvicorn's access log without query strings: a client may put a secret there (an API key sent
as `?api_key=...`), and query strings mean nothing to these routes. Nor does it log answered
probes: Docker's health check every 10 s and Prometheus's scrape every 5 s made ~26,000 lines a
day of a compose deployment's log; a probe that fails is still logged."""
from __future__ import annotations

import logging


def request_line(record: logging.LogRecord) -> tuple | None:
    """uvicorn.access's arguments (client address, method, path with query, HTTP version, status),
    or None for a record of another shape."""
    args = record.args
    ok = isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and isinstance(args[4], int)
    return args if ok else None


class DropQueryStrings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = request_line(record)
        if args is not None and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?<redacted>", args[3], args[4])
        return True


PROBES = frozenset({"/health", "/ping", "/metrics"})


class DropAnsweredProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = request_line(record)
        return args is None or not (args[2].split("?", 1)[0] in PROBES and args[4] < 400)


def install() -> None:
    access = logging.getLogger("uvicorn.access")
    access.addFilter(DropQueryStrings())
    access.addFilter(DropAnsweredProbes())
