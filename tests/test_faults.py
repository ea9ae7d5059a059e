"""Faults: mass disconnects and timeouts, SIGTERM while streaming (within and past the grace
period). Loopback only, bounded in count and time."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.helpers import wait_idle

MODEL = "smollm2-135m-instruct"


def body(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def test_200_disconnects_and_timeouts_leave_a_clean_engine(server, client):
    # a prompt shorter than a KV block: no prefix-cache hit, so the answer after the faults is computed
    # as the first one was, to the bit on every device (a chat prompt's cached blocks would leave the
    # second a shorter prefill, whose bf16 rounding on CUDA may differ)
    ask = {"model": MODEL, "prompt": "Name a fruit:", "max_tokens": 16, "temperature": 0,
           "extra_body": {"ignore_eos": True}}
    reference = client.completions.create(**ask).choices[0].text

    async def leave_early(c: httpx.AsyncClient, i: int):
        if i % 2:  # streaming: read a few events, then drop the connection
            async with c.stream("POST", "/v1/chat/completions",
                                json=body(f"Story number {i}", max_tokens=500, stream=True)) as r:
                async for n, _ in _aenumerate(r.aiter_lines()):
                    if n >= 3:
                        break
        else:  # non-streaming: give up after a short timeout
            try:
                await c.post("/v1/chat/completions", json=body(f"Essay number {i}", max_tokens=500), timeout=0.3)
            except httpx.TimeoutException:
                pass

    async def main():
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
            sem = asyncio.Semaphore(20)

            async def one(i):
                async with sem:
                    await leave_early(c, i)

            await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(200)]), timeout=240)

    asyncio.run(main())
    wait_idle(server, within_s=5)  # every client left: nothing runs, waits or holds KV
    t = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=2).status_code == 200
    assert time.monotonic() - t < 0.5
    assert server.metric("num_requests_waiting") == 0
    again = client.completions.create(**ask).choices[0].text
    assert again == reference


async def _aenumerate(aiter):
    n = 0
    async for item in aiter:
        yield n, item
        n += 1


def stream_events(url: str, payload: dict, started: threading.Event, out: list):
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    out.append(events)


def run_streams(srv, payload, n, then):
    results, threads, starts = [], [], []
    for _ in range(n):
        started = threading.Event()
        t = threading.Thread(target=stream_events, args=(srv.url, payload, started, results))
        t.start()
        threads.append(t)
        starts.append(started)
    for s in starts:
        assert s.wait(60)
    then()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("stall", [True, False])
def test_a_stream_answer_ends_its_request_even_if_no_event_went_out(stall):
    """A client that leaves while the headers are written cancels the SSE answer before its first
    event: a generator that never started never runs its `finally`, so its engine request went on
    decoding to max_tokens and held its queue place for good. Here the headers' write stalls and
    the client is gone (`stall`), or the answer runs whole; either way the stream is closed once and
    the request counted once."""
    from server.generation import EventStream

    class Stream:  # what the answer does to the engine's stream: close it
        def __init__(self):
            self.closes = 0

        def close(self):
            self.closes += 1

    class Timer:
        def __init__(self):
            self.ends = []

        def end(self, reason):
            self.ends.append(reason)

    started, sent = [], []

    async def events():
        started.append(True)
        yield "one"

    async def receive():
        if stall:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # the client stays

    async def send(message):
        if stall and message["type"] == "http.response.start":
            await asyncio.sleep(3600)  # a write that does not finish before the client is gone
        sent.append(message["type"])

    stream, timer = Stream(), Timer()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(asyncio.wait_for(EventStream(events(), stream, timer)(scope, receive, send), 30))
    assert started == ([] if stall else [True])
    assert sent == ([] if stall else ["http.response.start", "http.response.body", "http.response.body"])
    assert stream.closes >= 1 and timer.ends[:1] == ["abort"]


def test_sigterm_lets_in_flight_streams_finish_then_exits_0():
    srv = ServerProcess("--grace-period", "60", "--max-model-len", "512")
    payload = body("Count to twenty.", max_tokens=30, ignore_eos=True, stream=True)
    t0 = {}

    def sigterm():
        t0["t"] = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # no new work is accepted while draining
            r = httpx.post(srv.url + "/v1/chat/completions", json=body("hi", max_tokens=2), timeout=5)
            assert r.status_code == 503
        except httpx.TransportError:
            pass  # or the listening socket is already closed

    results = run_streams(srv, payload, 3, sigterm)
    assert len(results) == 3
    for events in results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 25
    assert srv.proc.wait(60) == 0


def test_sigterm_past_the_grace_period_ends_streams_with_an_error_event():
    srv = ServerProcess("--grace-period", "2", "--max-model-len", "2048")
    payload = body("Write a very long story.", max_tokens=1900, ignore_eos=True, stream=True)
    results = run_streams(srv, payload, 2, lambda: srv.proc.send_signal(signal.SIGTERM))
    assert len(results) == 2
    for events in results:
        assert events[-1] == "[DONE]"  # after the error event, as vLLM ends a failed stream
        last = json.loads(events[-2])
        assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error"
    assert srv.proc.wait(30) == 0


def test_a_second_ctrl_c_ends_streams_at_once_with_an_error_event():
    """The first Ctrl-C drains as SIGTERM does (the grace period here outlasts the streams' wait); a
    second quits at once, as uvicorn's does, each stream ended with its error event first (not cut)."""
    srv = ServerProcess("--grace-period", "300", "--max-model-len", "2048")
    payload = body("Write a very long story.", max_tokens=1900, ignore_eos=True, stream=True)

    def twice():
        srv.proc.send_signal(signal.SIGINT)
        time.sleep(1)
        srv.proc.send_signal(signal.SIGINT)

    results = run_streams(srv, payload, 2, twice)
    assert len(results) == 2
    for events in results:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "shutting_down" and "second Ctrl-C" in last["error"]["message"]
    assert srv.proc.wait(30) == 130  # (a process stopped by Ctrl-C)


def test_an_engine_thread_that_stops_fails_every_open_request_and_refuses_new_ones():
    """A bug outside any one request's work (here: taking a new request in raises) stops the engine
    thread. Nothing would step again, so every open request ends with EngineDeadError at once (a 503
    over HTTP), new ones are refused, and `on_dead` tells the server to exit (the CLI exits non-zero)."""
    from engine.async_engine import AsyncEngine, EngineDeadError, EngineNotReadyError
    from engine.sampling_params import SamplingParams
    from server.config_file import load_config, preset_path

    config = load_config(preset_path(MODEL))
    config.device, config.max_model_len = "cpu", 256
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)

    async def main():
        engine = AsyncEngine(config)
        await engine.start()
        died = asyncio.Event()
        engine.on_dead = lambda exc: died.set()
        ids = engine.tokenizer().encode("Tell me a long story.")
        running = engine.add_request("running", ids, params)
        await running.__anext__()  # it decodes

        def broken(seqs):
            raise RuntimeError("a bug in taking a request in")

        engine.engine.add_sequences = broken
        engine.add_request("trigger", ids, params)
        with pytest.raises(EngineDeadError, match="a bug in taking a request in"):
            async for _ in running:
                pass
        await asyncio.wait_for(died.wait(), 10)
        with pytest.raises(EngineNotReadyError, match="the engine stopped"):
            engine.add_request("after", ids, params)
        engine.stop()

    asyncio.run(asyncio.wait_for(main(), 60))  # a thread that died unnoticed left the stream waiting forever
