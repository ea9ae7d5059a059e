"""Soak test (not in CI): N streaming clients for T minutes against a running skipserve; every
response is checked (well-formed SSE, [DONE], a finish_reason, usage consistent with the stream),
and errors plus the server's RSS are reported over time.

    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --pid $(pgrep -f 'skipserve') \\
        --clients 64 --minutes 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx

PROMPTS = ["Tell me a fact about the sea.", "Write two lines about spring.", "What is a prime number?",
           "Describe a cat.", "Give me a tip for sleeping well.", "Name three rivers."]


def rss_mb(pid: int | None) -> float:
    if not pid:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def check_one(client: httpx.AsyncClient, url: str, model: str, rng: random.Random) -> str | None:
    """One streaming request; -> None if the response is correct, else what was wrong."""
    max_tokens = rng.randint(4, 48)
    payload = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
               "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "stream": True,
               "stream_options": {"include_usage": True},
               "ffn_skip": {"budget": rng.choice([0.0, 0.1, 0.25])}}
    text, finish, usage, done = "", None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return f"error event {event['error'].get('code')}"
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices") or []:
                text += (c.get("delta") or {}).get("content") or ""
                finish = c.get("finish_reason") or finish
    if not done or finish not in ("stop", "length") or usage is None:
        return f"incomplete stream (done={done}, finish={finish}, usage={usage is not None})"
    if usage["completion_tokens"] > max_tokens or (finish == "length" and usage["completion_tokens"] != max_tokens):
        return f"usage {usage['completion_tokens']} vs max_tokens {max_tokens} ({finish})"
    skip = usage.get("ffn_skip", {})
    if skip.get("ratio", 0) > payload["ffn_skip"]["budget"] + 1e-9:
        return "skip ratio above budget"
    return None


async def main_async(args) -> dict:
    stats = {"ok": 0, "failed": 0, "errors": {}, "rss": []}
    deadline = time.monotonic() + args.minutes * 60
    start = time.monotonic()

    async def client_loop(i: int):
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=300) as client:
            while time.monotonic() < deadline:
                try:
                    problem = await check_one(client, args.url, args.model, rng)
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    problem = type(exc).__name__
                if problem:
                    stats["failed"] += 1
                    stats["errors"][problem] = stats["errors"].get(problem, 0) + 1
                else:
                    stats["ok"] += 1

    async def reporter():
        while time.monotonic() < deadline:
            stats["rss"].append((round(time.monotonic() - start), rss_mb(args.pid)))
            print(f"t={time.monotonic() - start:5.0f}s ok={stats['ok']} failed={stats['failed']} "
                  f"rss={stats['rss'][-1][1]:.0f} MB", flush=True)
            await asyncio.sleep(args.report_every)

    await asyncio.gather(reporter(), *[client_loop(i) for i in range(args.clients)])
    return stats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pid", type=int, default=None, help="server process id, for RSS")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--report-every", type=float, default=30)
    args = p.parse_args()
    stats = asyncio.run(main_async(args))
    rss = [r for _, r in stats["rss"]]
    print(json.dumps({"clients": args.clients, "minutes": args.minutes, "ok": stats["ok"], "failed": stats["failed"],
                      "errors": stats["errors"], "rss_first_mb": rss[0] if rss else None,
                      "rss_last_mb": rss[-1] if rss else None, "rss_max_mb": max(rss) if rss else None}))


if __name__ == "__main__":
    main()
