"""Big requests against a running server (not in CI): how long `/health` waits while each is read,
tokenized and answered. A number much above the idle one means the event loop (or Python's GIL)
was held for that long, and every stream and probe waited with it.

    .venv/bin/python bench/big_bodies.py --url http://127.0.0.1:8000

The bodies stay under the default --max-request-bytes (4 MiB); the prompts are refused as too long
after tokenizing (a 400), /tokenize and /detokenize answer in full.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import httpx

TEXT = "hello world " * 300_000  # 3.6 MB, 600k tokens for SmolLM2
IDS = [28] * 600_000  # 2.4 MB of token ids
BODIES = [
    ("nothing sent (idle)", None, None),
    ("completions, 600k token ids", "/v1/completions", {"prompt": IDS, "max_tokens": 1}),
    ("completions, 3.6 MB text", "/v1/completions", {"prompt": TEXT, "max_tokens": 1}),
    ("chat, 3.6 MB message", "/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 1}),
    ("embeddings, 3.6 MB text", "/v1/embeddings", {"input": TEXT}),
    ("tokenize (vLLM's), 3.6 MB", "/tokenize", {"prompt": TEXT}),
    ("tokenize (llama.cpp's, with pieces)", "/tokenize", {"content": TEXT, "with_pieces": True}),
    ("tokenize (TGI's)", "/tokenize", {"inputs": TEXT}),
    ("detokenize, 600k ids", "/detokenize", {"tokens": IDS}),
]


def probe(url: str, stop: threading.Event, waits: list[float]) -> None:
    with httpx.Client() as client:
        while not stop.is_set():
            start = time.monotonic()
            client.get(url + "/health", timeout=60)
            waits.append(time.monotonic() - start)
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    print("| request | status | its time (s) | worst /health meanwhile (s) |\n|---|---:|---:|---:|")
    for label, path, body in BODIES:
        stop, waits = threading.Event(), []
        prober = threading.Thread(target=probe, args=(args.url, stop, waits))
        prober.start()
        time.sleep(0.3)
        start, status = time.monotonic(), "-"
        if path is None:
            time.sleep(1.0)
        else:
            data = json.dumps(body).encode()
            r = httpx.post(args.url + path, content=data, headers={"content-type": "application/json"}, timeout=300)
            status = r.status_code
        took = time.monotonic() - start
        time.sleep(0.2)
        stop.set()
        prober.join()
        print(f"| {label} | {status} | {took:.2f} | {max(waits):.3f} |")


if __name__ == "__main__":
    main()
