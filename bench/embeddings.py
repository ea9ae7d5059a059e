"""/v1/embeddings benchmark: skipserve against any OpenAI-compatible embeddings server (`--peer
URL`, e.g. llama.cpp's `llama-server --embeddings --pooling mean` on the same GGUF), same texts,
targets alternated each round (A B, then B A).

Per target: inputs/s and input tokens/s for requests of `--batch` inputs sent `--concurrency`
at a time (every text unique, so no prefix cache serves it), p50 / p99 request latency; a small
retrieval check (each of 12 sentences must find its paraphrase among the 12 paraphrases, and the
mean cosine of pairs against non-pairs, each sentence sent alone), and how far a vector moves
when its text comes in a batch of 24 rather than alone; and between targets, the cosine of their two vectors
for the same text (the same weights and pooling should give ~1).

    .venv/bin/python bench/embeddings.py --url http://127.0.0.1:8000 --peer llama.cpp=http://127.0.0.1:8081 \\
        --out bench/out
"""
from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_report  # noqa: E402

PAIRS = [("The cat sat on the mat.", "A cat was sitting on the rug."),
         ("How do I reset my password?", "I forgot my password, how can I change it?"),
         ("The stock market fell sharply today.", "Shares dropped steeply in today's trading."),
         ("She plays the violin in an orchestra.", "She is a violinist in a symphony orchestra."),
         ("Paris is the capital of France.", "France's capital city is Paris."),
         ("It will rain tomorrow afternoon.", "Expect showers tomorrow in the afternoon."),
         ("The recipe needs two cups of flour.", "You need 2 cups of flour for this recipe."),
         ("He fixed the bug in the login code.", "He repaired the defect in the sign-in code."),
         ("Dogs are loyal pets.", "Canines make faithful companions."),
         ("The train to Berlin leaves at noon.", "The Berlin train departs at 12 pm."),
         ("Photosynthesis converts light into chemical energy.", "Plants turn sunlight into chemical energy."),
         ("My laptop battery drains too fast.", "The battery on my notebook runs out quickly.")]
SENTENCES = [a for a, _ in PAIRS] + [b for _, b in PAIRS]


def document(i: int, words: int) -> str:
    """A unique text of about `words` words (its number first, so no two share a prefix)."""
    body = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(words // 7 + 1)).split()[:words]
    return f"Document {i}: " + " ".join(body)


async def embed(client: httpx.AsyncClient, url: str, model: str, texts: list[str]) -> tuple[list, int]:
    r = await client.post(url + "/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "float"})
    r.raise_for_status()
    body = r.json()
    data = sorted(body["data"], key=lambda d: d["index"])
    return [d["embedding"] for d in data], body.get("usage", {}).get("prompt_tokens", 0)


async def throughput(url: str, model: str, docs: list[str], batch: int, concurrency: int) -> dict:
    """All of `docs`, `batch` a request, `concurrency` requests in flight."""
    requests = [docs[i:i + batch] for i in range(0, len(docs), batch)]
    latencies, tokens = [], 0
    queue = list(requests)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            nonlocal tokens
            while queue:
                texts = queue.pop(0)
                t0 = time.perf_counter()
                _, n = await embed(client, url, model, texts)
                latencies.append(time.perf_counter() - t0)
                tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"inputs_per_s": len(docs) / wall, "tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def retrieval(url: str, model: str) -> tuple[dict, list]:
    """The check's sentences one a request (each alone), then all in one request (as a batch)."""
    async with httpx.AsyncClient(timeout=600) as client:
        vectors = [(await embed(client, url, model, [text]))[0][0] for text in SENTENCES]
        batched, _ = await embed(client, url, model, SENTENCES)
    n = len(PAIRS)
    left, right = vectors[:n], vectors[n:]
    sims = [[cosine(left[i], right[j]) for j in range(n)] for i in range(n)]
    found = sum(max(range(n), key=lambda j: sims[i][j]) == i for i in range(n))
    paired = statistics.mean(sims[i][i] for i in range(n))
    unpaired = statistics.mean(sims[i][j] for i in range(n) for j in range(n) if i != j)
    in_batch = [cosine(a, b) for a, b in zip(vectors, batched)]
    return {"found": found, "of": n, "paired_cos": paired, "unpaired_cos": unpaired,
            "batch_vs_alone_min_cos": min(in_batch)}, vectors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", default=[], help="skipserve, NAME=URL or URL (repeatable)")
    ap.add_argument("--peer", action="append", default=[],
                    help="another OpenAI-compatible server, NAME=URL or URL (repeatable)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--docs", type=int, default=64, help="texts per round and target")
    ap.add_argument("--words", default="24,96,384", help="text lengths (words), cycled over the texts")
    ap.add_argument("--batch", default="1,16", help="inputs per request, one setting per comma")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    targets = [tuple(u.split("=", 1)) if "=" in u else ("skipserve", u) for u in args.url or ["http://127.0.0.1:8000"]]
    targets += [tuple(u.split("=", 1)) if "=" in u else (f"peer {u}", u) for u in args.peer]
    words = [int(w) for w in args.words.split(",")]
    results = {name: {} for name, _ in targets}
    for batch in [int(b) for b in args.batch.split(",")]:
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for name, url in order:
                docs = [document(10_000 * (r + 1) + 100 * batch + i + 1_000_000 * targets.index((name, url)),
                                 words[i % len(words)]) for i in range(args.docs)]
                m = asyncio.run(throughput(url, args.model, docs, batch, args.concurrency))
                results[name].setdefault(batch, []).append(m)
    checks, vectors = {}, {}
    for name, url in targets:
        checks[name], vectors[name] = asyncio.run(retrieval(url, args.model))
    lines = [f"command: bench/embeddings.py {' '.join(sys.argv[1:])}",
             f"{args.docs} unique texts per round and target ({args.words} words, cycled), "
             f"{args.concurrency} requests in flight, medians of {args.rounds} rounds alternated", "",
             "| target | inputs a request | inputs/s | input tok/s | p50 / p99 request (s) |",
             "|---|---:|---:|---:|---:|"]
    for name, per_batch in results.items():
        for batch, runs in per_batch.items():
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            lines.append(f"| {name} | {batch} | {med['inputs_per_s']:.1f} | {med['tokens_per_s']:.0f} | "
                         f"{med['p50_s']:.2f} / {med['p99_s']:.2f} |")
    first = targets[0][0]
    for name, _ in targets[1:]:
        for batch in results[first]:
            ours = statistics.median(run["inputs_per_s"] for run in results[first][batch])
            theirs = statistics.median(run["inputs_per_s"] for run in results[name][batch])
            lines.append(f"\n{first} / {name}, {batch} a request: {ours / theirs:.2f}x inputs/s")
    lines += ["", "| target | paraphrase found (top-1) | mean cosine, pairs | mean cosine, non-pairs | "
              "in a batch vs alone, min cosine |", "|---|---:|---:|---:|---:|"]
    for name, c in checks.items():
        lines.append(f"| {name} | {c['found']} / {c['of']} | {c['paired_cos']:.3f} | {c['unpaired_cos']:.3f} | "
                     f"{c['batch_vs_alone_min_cos']:.4f} |")
    for name, _ in targets[1:]:
        agree = [cosine(a, b) for a, b in zip(vectors[first], vectors[name])]
        lines.append(f"\n{first} vs {name}, same text: cosine min {min(agree):.4f}, mean {statistics.mean(agree):.4f}")
    write_report(args.out, "embeddings", lines, {"throughput": results, "retrieval": checks})


if __name__ == "__main__":
    main()
