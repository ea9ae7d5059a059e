"""HTTP serving benchmark: streaming chat requests at a concurrency sweep, against skipserve (dense
and with FFN-skip budgets) and any other OpenAI-compatible server (`--peer URL`), same prompts,
targets alternated at each concurrency level. Metrics as vLLM's `bench serve` defines them:
TTFT, TPOT = (e2e - TTFT) / (output tokens - 1), ITL between streamed chunks, e2e latency,
aggregate output tok/s and requests/s.

    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --peer http://127.0.0.1:8081 \\
        --concurrency 1,16 --budgets 0,0.25 --out bench/out

`--system-prompt-words N`: every request of a level carries the same system prompt of N words
before its question, as the clients of one application share theirs; a fresh one for each target
and level (nothing cached from before), so the level measures requests that arrive together with
a long common prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, step by step.",
    "Describe your ideal weekend in detail.",
    "Give advice to someone learning to cook.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why exercise is good for health.",
    "Describe a busy market in a big city.",
    "Tell me about the history of bicycles.",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itls: list = field(default_factory=list)
    error: str = ""
    ffn_skipped: int = 0
    ffn_total: int = 0


@dataclass
class Target:
    name: str
    url: str
    model: str
    extra: dict


def system_prompt(words: int, tag: str) -> str:
    """`words` words of rules, opened by `tag` (which makes it new to the server's prefix cache)."""
    rules = " ".join(f"Rule {i}: answer politely, cite section {i} of the handbook, keep it short."
                     for i in range(words // 12 + 1))
    return " ".join([*f"Session {tag}.".split(), *rules.split()][:words])


async def one_request(client: httpx.AsyncClient, target: Target, prompt: list[dict], max_tokens: int) -> Result:
    """One streamed request. A pooled keep-alive connection the server closed just before it was
    reused (llama-server does, now and then, after a stream) is retried once on a new one, as
    the `openai` client retries it; the retry's clock starts afresh."""
    result = await _stream_request(client, target, prompt, max_tokens)
    if not result.ok and result.error.startswith("RemoteProtocolError: Server disconnected without sending"):
        result = await _stream_request(client, target, prompt, max_tokens)
    return result


async def _stream_request(client: httpx.AsyncClient, target: Target, prompt: list[dict], max_tokens: int) -> Result:
    payload = {"model": target.model, "messages": prompt, "max_tokens": max_tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
               **target.extra}
    start = time.perf_counter()
    first, last, chunks, usage_tokens, skip = None, None, 0, None, {}
    itls = []
    try:
        async with client.stream("POST", target.url + "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, error=str(event["error"])[:200])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                    skip = event["usage"].get("ffn_skip") or {}
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        itls.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}"[:200])
    end = time.perf_counter()
    if first is None:
        return Result(False, error="no content")
    return Result(True, ttft=first - start, e2e=end - start, tokens=usage_tokens or chunks, itls=itls,
                  ffn_skipped=skip.get("skipped", 0), ffn_total=skip.get("total", 0))


async def run_level(target: Target, concurrency: int, num_requests: int, max_tokens: int, timeout: float,
                    system_words: int = 0) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    queue: asyncio.Queue = asyncio.Queue()
    system = [{"role": "system", "content": system_prompt(system_words, f"{time.time_ns()}")}] if system_words else []
    for i in range(num_requests):
        queue.put_nowait([*system, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker():
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, target, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]

    def pct(values, q):
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [x for r in ok for x in r.itls]
    tokens = sum(r.tokens for r in ok)
    return {
        "target": target.name, "concurrency": concurrency, "requests": num_requests, "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "output_tok_s": tokens / wall, "req_s": len(ok) / wall, "wall_s": wall,
        "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99),
        "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99), "e2e_p50": pct(e2e, 0.5), "e2e_p99": pct(e2e, 0.99),
        "mean_output_tokens": statistics.mean([r.tokens for r in ok]) if ok else 0,
        "ffn_skip_ratio": (sum(r.ffn_skipped for r in ok) / total_ffn
                           if (total_ffn := sum(r.ffn_total for r in ok)) else None),
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| target | conc. | ok/total | out tok/s | req/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | e2e p50 / p99 (s) | FFN skip |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['requests'] - r['failed']}/{r['requests']} | "
            f"{r['output_tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
            f"{r['tpot_p50'] * 1e3:.0f} / {r['tpot_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | "
            f"{r['e2e_p50']:.2f} / {r['e2e_p99']:.2f} | "
            f"{'-' if r['ffn_skip_ratio'] is None else format(r['ffn_skip_ratio'], '.3f')} |")
    return "\n".join(lines) + "\n"


def memory(url: str) -> dict:
    """A skipserve target's resident memory and KV cache from its /metrics (bytes; None where absent)."""
    values = {}
    for line in httpx.get(url.rstrip("/") + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("process_resident_memory_bytes", "skipserve:kv_cache_bytes"):
            values[name] = float(value)
    return {"rss_bytes": values.get("process_resident_memory_bytes"), "kv_cache_bytes": values.get("skipserve:kv_cache_bytes")}


def memory_line(label: str, m: dict, when: str) -> str:
    if m["rss_bytes"] is None or m["kv_cache_bytes"] is None:
        return f"skipserve {label}: no memory figures in its /metrics"
    rss, kv = m["rss_bytes"] / 2**20, m["kv_cache_bytes"] / 2**20
    return f"skipserve {label}: RSS {rss:.0f} MiB {when}, of which KV cache {kv:.0f} MiB; RSS - KV {rss - kv:.0f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=[],
                   help="skipserve base URL, optionally LABEL=URL (repeatable; default http://127.0.0.1:8000)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--budgets", default="0,0.25", help="ffn_skip budgets to measure on skipserve")
    p.add_argument("--peer", action="append", default=[], help="another OpenAI-compatible base URL (repeatable)")
    p.add_argument("--peer-model", default=None, help="model name to send to peers (default: --model)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sampling", type=json.loads, default={},
                   help='sampling fields every request carries, as JSON (default greedy), e.g. \'{"temperature": 0.8, "top_p": 0.95}\'')
    p.add_argument("--system-prompt-words", type=int, default=0,
                   help="a system prompt of this many words, common to a level's requests (default: none)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()

    urls = [u.split("=", 1) if "=" in u else ["", u] for u in args.url or ["http://127.0.0.1:8000"]]
    targets = [Target(f"skipserve{f' {label}' if label else ''} budget {float(b):g}", url, args.model,
                      {**args.sampling, **({"ffn_skip": {"budget": float(b)}} if float(b) else {})})
               for label, url in urls for b in args.budgets.split(",")]
    targets += [Target(f"peer {u}", u, args.peer_model or args.model, dict(args.sampling)) for u in args.peer]
    loaded = {label or url: memory(url) for label, url in urls}  # idle servers: their RSS after load
    for label, m in loaded.items():
        print(memory_line(label, m, "before the run"), flush=True)
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = args.requests or max(8, 2 * c)
        for target in targets:  # alternate targets at each level: same load conditions
            row = asyncio.run(run_level(target, c, n, args.max_tokens, args.timeout, args.system_prompt_words))
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (f"`{' '.join(sys.argv)}` — streaming chat, {args.max_tokens} output tokens (ignore_eos), "
              f"{json.dumps(args.sampling) if args.sampling else 'greedy'}, prompts from bench/serve.py"
              + (f" after a common system prompt of {args.system_prompt_words} words" if args.system_prompt_words else ""))
    served = {label or url: memory(url) for label, url in urls}  # and after every level's requests
    md = markdown(rows, header) + "\n" + "\n".join(
        [memory_line(k, m, "before the run") for k, m in loaded.items()]
        + [memory_line(k, m, "after it") for k, m in served.items()]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.md").write_text(md)
    (out / "serve.json").write_text(json.dumps({"rows": rows, "memory": {"before": loaded, "after": served}}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
