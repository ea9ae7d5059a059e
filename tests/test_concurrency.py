"""Continuous batching under real concurrent clients, and cancellation that frees KV at once."""
from __future__ import annotations

import asyncio

import httpx
import openai

from tests.conftest import ServerProcess, cpu_path_only, cuda_available
from tests.helpers import stream_chat, wait_idle

MODEL = "smollm2-135m-instruct"
TOPICS = ["the moon", "a cat", "rain", "bread", "trains", "music", "winter", "the ocean", "a robot", "coffee",
          "mountains", "a library", "bees", "chess", "a river", "snow", "a lighthouse", "tea", "autumn", "clocks"]


def messages(topic):
    return [{"role": "user", "content": f"Write one sentence about {topic}."}]


@cpu_path_only
def test_20_concurrent_streams_each_match_their_solo_greedy_text(server, client):
    solo = {t: client.chat.completions.create(model=MODEL, messages=messages(t), max_tokens=24,
                                              temperature=0).choices[0].message.content for t in TOPICS}

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*[stream_chat(aclient, model=MODEL, messages=messages(t), max_tokens=24,
                                                      temperature=0) for t in TOPICS])
        finally:
            await aclient.close()

    streamed = [text for text, _ in asyncio.run(main())]
    mismatched = [t for t, text in zip(TOPICS, streamed) if text != solo[t]]
    assert not mismatched, mismatched


def ended(server, reason: str) -> float:
    try:
        return server.metric("request_success_total", f'{{finished_reason="{reason}"}}')
    except KeyError:  # no request has ended so yet
        return 0.0


def test_client_disconnect_mid_stream_aborts_and_frees_kv(server):
    body = {"model": MODEL, "messages": messages("everything"), "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:  # still reading: the request is running
                assert server.metric("num_requests_running") == 1
                before = ended(server, "abort")
                break  # leaving the iterator closes the connection
    wait_idle(server, within_s=1.0)
    assert ended(server, "abort") == before + 1  # counted as vLLM counts aborts


def test_client_disconnect_non_streaming_aborts(server):
    body = {"model": MODEL, "messages": messages("everything"), "max_tokens": 1000, "ignore_eos": True}
    before = ended(server, "abort")
    try:
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.5)
    except httpx.TimeoutException:
        pass
    wait_idle(server, within_s=1.0)
    assert ended(server, "abort") == before + 1


def test_every_route_but_the_probes_is_behind_the_api_key():
    """Each route the app serves (every router's, the run-time LoRA routes too) is gated, but the
    probes, the metrics scrape and the version."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from server.access_gate import OPEN_PATHS, _gated
    from server.app import create_app

    def paths(routes):
        for route in routes:
            if hasattr(route, "original_router"):  # (an included router)
                yield from paths(route.original_router.routes)
            elif hasattr(route, "routes"):
                yield from paths(route.routes)
            else:
                yield route.path

    served = set(paths(create_app(AsyncEngine(EngineConfig()), ("m",), runtime_lora=True).routes))
    assert {"/v1/chat/completions", "/completion", "/lora-adapters", "/v1/load_lora_adapter", "/health"} <= served
    assert sorted(p for p in served if not _gated(p)) == sorted(OPEN_PATHS)


def test_api_key_and_queue_full(tmp_path):
    srv = ServerProcess("--api-key", "s3cret", "--max-batch", "1", "--max-waiting", "1", "--max-model-len", "512")
    try:
        body = {"model": MODEL, "messages": messages("tea"), "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # open without a key
        # without the key a body is not even read: 401, not the 413 its size would get
        big = httpx.post(srv.url + "/v1/chat/completions", content=b"x" * (5 * 2**20),
                         headers={"content-type": "application/json"})
        assert big.status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):  # the API's description is behind the key
            assert httpx.get(srv.url + path).status_code == 401
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # a key in the query string is not how to authenticate, and the access log never shows it
        assert httpx.get(srv.url + "/v1/models?api_key=s3cret").status_code == 401
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, messages=messages("tea"), max_tokens=2).choices

        async def flood():
            headers = {"Authorization": "Bearer s3cret"}
            long = {**body, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
            async with httpx.AsyncClient(timeout=120, headers=headers) as c:
                return await asyncio.gather(*[c.post(srv.url + "/v1/chat/completions", json=long)
                                              for _ in range(5)])

        results = asyncio.run(flood())
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 40

        async def batch_beside_a_stream():
            """A batch whose second prompt finds the queue full: taken whole or not at all."""
            headers = {"Authorization": "Bearer s3cret"}
            batch = {"model": MODEL, "prompt": ["Tea is", "Coffee is"], "max_tokens": 2}
            async with httpx.AsyncClient(timeout=120, headers=headers) as c:
                stream = {**body, "max_tokens": 40, "ignore_eos": True, "stream": True}
                async with c.stream("POST", srv.url + "/v1/chat/completions", json=stream) as running:
                    lines = running.aiter_lines()
                    await lines.__anext__()  # it holds the one row; the queue has room for one more
                    refused = await c.post(srv.url + "/v1/completions", json=batch)
                    async for _ in lines:
                        pass
                return refused, await c.post(srv.url + "/v1/completions", json=batch)

        refused, taken = asyncio.run(batch_beside_a_stream())
        assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
        assert "(1 of 2 sequences running or waiting; this request needs 2)" in refused.json()["error"]["message"]
        assert taken.status_code == 200 and len(taken.json()["choices"]) == 2  # the refused batch left nothing queued
        assert srv.metric("num_requests_waiting") == srv.metric("num_requests_running") == 0

        async def chat_beside_a_long_embeddings_batch():
            """The queue holds 2; an embeddings batch goes in windows of half of it, so a chat finds room."""
            headers = {"Authorization": "Bearer s3cret"}
            texts = [f"Passage {i}: " + "words to embed, " * 20 for i in range(24)]
            async with httpx.AsyncClient(timeout=120, headers=headers) as c:
                batch = asyncio.create_task(c.post(srv.url + "/v1/embeddings", json={"model": MODEL, "input": texts}))
                while not await asyncio.to_thread(srv.metric, "num_requests_running"):
                    await asyncio.sleep(0.02)
                chat = await c.post(srv.url + "/v1/chat/completions", json=body)
                assert not batch.done()  # the chat did not wait for the whole batch
                return chat, await batch

        chat, batch = asyncio.run(chat_beside_a_long_embeddings_batch())
        assert chat.status_code == 200, chat.text
        assert batch.status_code == 200 and len(batch.json()["data"]) == 24
    finally:
        assert srv.stop() == 0
    log = srv.log_path.read_text() if srv.log_path else ""
    assert "s3cret" not in log  # the key is compared in constant time and never logged
    if srv.log_path:  # the access log: the query string left out, answered probes too
        assert '"GET /v1/models?<redacted> HTTP/1.1" 401' in log
        assert '"GET /health HTTP/1.1" 200' not in log and '"GET /metrics HTTP/1.1" 200' not in log


def test_preempted_streams_finish_with_their_unpressed_text_and_are_counted(client):
    """A server whose KV cache holds 20 blocks serves 6 concurrent streams that outgrow it: requests
    are preempted and resumed, never failed, and each streams the text a roomy server gives where
    that is promised: on the CPU path (bit for bit whatever a row's neighbours, and when its K/V are
    recomputed), not on CUDA (bf16 GEMMs round a row by the batch's shape: conftest.cpu_path_only)."""
    topics = TOPICS[:6]
    body = {"model": MODEL, "max_tokens": 64, "temperature": 0, "extra_body": {"ignore_eos": True}}
    exact = not cuda_available()
    roomy = {t: client.chat.completions.create(messages=messages(t), **body).choices[0].message.content
             for t in topics} if exact else {}
    srv = ServerProcess("--kv-capacity-tokens", "320", "--max-model-len", "256")
    try:
        async def main():
            aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            try:
                return await asyncio.gather(*[stream_chat(aclient, messages=messages(t), **body) for t in topics])
            finally:
                await aclient.close()

        pressed = asyncio.run(main())
        assert srv.metric("num_preemptions_total") > 0
        assert srv.metric("kv_cache_usage_ratio") == 0
    finally:
        srv.stop()
    assert [reason for _, reason in pressed] == ["length"] * len(topics)
    assert all(text for text, _ in pressed)
    if exact:
        assert [text for text, _ in pressed] == [roomy[t] for t in topics]
