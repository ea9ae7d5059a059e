"""`python -m server.healthcheck [PID]`: exit 0 when the server running as PID (default 1, a
container's entrypoint) answers GET /health with 200.

The address comes from that process's own command line (its --host and --port, with
$SKIPSERVE_HOST/PORT as the defaults, as the server reads them), so `docker run skipserve --port
9000` is probed on 9000. A server that listens on every address is probed on loopback. Nothing
heavier than argparse and the CLI module is imported (not FastAPI, not torch): the probe runs every
few seconds under a 3 s timeout."""
from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from pathlib import Path

ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_argv(cmdline: list[str]) -> list[str]:
    """The serve arguments within a process's argv: what follows `skipserve` (the console script)
    or `-m server.cli`, without a leading `serve`."""
    for i, arg in enumerate(cmdline):
        if Path(arg).name == "skipserve" or (arg == "server.cli" and i and cmdline[i - 1] == "-m"):
            rest = cmdline[i + 1:]
            return rest[1:] if rest[:1] == ["serve"] else rest
    raise ValueError(f"not a skipserve command line: {' '.join(cmdline)!r}")


def health_url(argv: list[str]) -> str:
    from server.cli import listen_defaults

    host, port = listen_defaults()
    parser = argparse.ArgumentParser(add_help=False)  # abbreviations too (`--por 9000`), as the server's parser
    parser.add_argument("--host", "--hostname", default=host)  # (--hostname: TGI's spelling)
    parser.add_argument("--port", default=port)
    args, _ = parser.parse_known_args(argv)
    host = ANY_ADDRESS.get(args.host, args.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{args.port}/health"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pid = argv[0] if argv else "1"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        url = health_url(server_argv(cmdline))
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 0 if reply.status == 200 else 1
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError (503 while draining)
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    except SystemExit:  # argparse on an argument it cannot read (the server itself would not have started)
        return 1


if __name__ == "__main__":
    sys.exit(main())
