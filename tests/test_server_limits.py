"""The server stays responsive under hostile connections: oversized bodies are refused before
parsing, slow headers are cut, nothing prints a secret, and a model that cannot load ends the
process with the reason."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import ROOT, STARTUP_TIMEOUT_S, ServerProcess, free_port

MODEL = "smollm2-135m-instruct"


def health_latency(server) -> float:
    t = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    return time.monotonic() - t


def test_oversized_bodies_get_413_and_health_stays_fast(server):
    from server.body_limit import DEFAULT_MAX_REQUEST_BYTES

    big = b'{"model": "x", "prompt": "' + b"a" * (2 * DEFAULT_MAX_REQUEST_BYTES) + b'"}'
    latencies = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            latencies.append(health_latency(server))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(3):  # declared length
            r = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"},
                           timeout=60)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: refused once the limit is passed
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        try:
            r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == 413
        except httpx.WriteError:  # the server answered 413 and closed before the client finished
            pass
    finally:
        stop.set()
        poller.join()
    # a body just under the limit is parsed and validated as usual: here a prompt too long for the context
    near = {"model": MODEL, "prompt": "a " * ((DEFAULT_MAX_REQUEST_BYTES - 100) // 2)}
    r = httpx.post(server.url + "/v1/completions", json=near, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert latencies and max(latencies) < 1.0, latencies  # generous: a blocked loop stalled it for seconds


def test_connections_that_never_finish_their_headers_are_closed(server):
    """The session server runs with --header-timeout 3."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        t = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert 2 < time.monotonic() - t < 20
    # a complete request on a kept-alive connection is unaffected
    with httpx.Client() as c:
        assert c.get(server.url + "/health").status_code == 200
        assert c.get(server.url + "/v1/models").status_code == 200


def test_a_body_that_stops_coming_is_answered_408_and_closed(server):
    """The session server runs with --body-timeout 3: the deadline is between two reads, so a body
    that keeps coming, however slowly, is read whole."""
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2}).encode()

    def head(path: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()

    # two stalled at once: the 408 in each route's own shape (Anthropic's on its Messages route)
    paths = ("/v1/completions", "/v1/messages")
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in paths]
    answers = []
    for s, path in zip(stalled, paths):
        s.sendall(head(path).replace(b"Host: x", b"Host: x\r\nx-request-id: stalled-408") + body[:5])  # never the rest
    t = time.monotonic()
    for s in stalled:
        with s:
            answer = b""
            while chunk := s.recv(65536):  # until the server closes it
                answer += chunk
            answers.append(answer.partition(b"\r\n\r\n"))
    assert 2 < time.monotonic() - t < 20
    for (status, _, payload), path in zip(answers, paths):
        assert status.startswith(b"HTTP/1.1 408"), status
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        assert b"\r\nx-request-id: stalled-408" in status  # (the client's id, as every answer carries it)
        assert f'"POST {path} HTTP/1.1" 408' in server.log_tail(200)  # its access-log line
    (_, _, openai_shaped), (anthropic_status, _, anthropic_shaped) = answers
    assert json.loads(openai_shaped)["error"]["type"] == "invalid_request_error"
    assert json.loads(anthropic_shaped)["type"] == "error"
    assert json.loads(anthropic_shaped)["error"]["type"] == "timeout_error"
    assert b"\r\nrequest-id: stalled-408" in anthropic_status  # (the header the anthropic SDK reads)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head("/v1/completions"))
        for i in range(0, len(body), len(body) // 4 + 1):  # 4 s in all, 1 s between reads
            time.sleep(1)
            s.sendall(body[i:i + len(body) // 4 + 1])
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_timeouts_of_0_are_none():
    """--header-timeout 0 and --body-timeout 0 switch the deadlines off (as gunicorn's --timeout 0);
    taken as deadlines they closed every connection at once."""
    srv = ServerProcess("--header-timeout", "0", "--body-timeout", "0", "--max-model-len", "256")
    try:
        body = json.dumps({"prompt": "Hello"}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\n")
            time.sleep(1.5)  # the headers' end late
            s.sendall(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:4])
            time.sleep(1.5)  # and the body's
            s.sendall(body[4:])
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        srv.stop()


def test_help_never_prints_the_api_key_and_shows_real_defaults():
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SKIPSERVE_API_KEY": "hunter2-secret"}, check=True).stdout
    assert "hunter2" not in out
    assert "default: None" not in out
    assert "(preset default: 16)" in " ".join(out.split())  # --max-batch, from server/presets/smollm2-135m-instruct.yaml


def test_a_model_that_cannot_load_exits_nonzero_with_the_reason(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()), "--model", str(bad),
                          "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1 and "the model failed to load" in out.stdout + out.stderr


def test_max_input_tokens_over_the_context_the_model_caps_stops_the_start():
    """--max-model-len 100000 is capped to the model's 8,192 tokens as it loads: a --max-input-tokens
    of 50,000, below the flag's context but not the model's, stops the start (it served, /info
    reporting more input than the context)."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()), "--max-model-len", "100000",
                          "--max-input-tokens", "50000", "--max-batch", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "--max-input-tokens 50000 must be below the context, 8192 tokens" in out.stdout + out.stderr


def test_broken_files_of_a_model_folder_are_named(tmp_path):
    """The libraries' own messages name no file: "Model missing. at line 1 column 2" for a tokenizer,
    "header too large" for safetensors weights."""
    from engine.loader import load_state_dict
    from engine.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer this reads"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file this reads"):
        load_state_dict(tmp_path)


def test_long_answers_encoded_in_pieces_are_the_json_of_the_whole():
    """server/json_body.py: a long list (alone or a dict's value) written a piece at a time reads back
    as the same JSON, at piece boundaries and across them."""
    import json

    from server.json_body import PIECE, _in_pieces

    for n in (0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7):
        tokens = [{"id": i, "piece": "é\"\\" if i % 3 else [0, 255]} for i in range(n)]
        for value in (tokens, list(range(n)), {"tokens": tokens, "count": n, "nested": {"ids": list(range(n))}}):
            assert json.loads(_in_pieces(value)) == value
