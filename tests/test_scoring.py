"""vLLM's /v1/score and /v1/rerank (and /score, /rerank, /v2/rerank) over HTTP with the real model:
each score is the cosine similarity of the two texts' embeddings, the same vectors /v1/embeddings
gives; /score pairs one text with many or item by item; /rerank lists documents best first."""
from __future__ import annotations

import math

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "Bananas are yellow when they are ripe.",
        "The Eiffel Tower stands in Paris.", "Paris is the capital and largest city of France."]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _embeddings(server, texts: list[str]) -> list[list[float]]:
    r = _post(server, "/v1/embeddings", {"model": MODEL, "input": texts})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def _cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_score_one_with_many_and_item_by_item_is_the_embeddings_cosine(server):
    vectors = _embeddings(server, [QUERY] + DOCS)
    r = _post(server, "/v1/score", {"model": MODEL, "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"score"}
    for d, doc in zip(body["data"], vectors[1:]):
        assert math.isclose(d["score"], _cosine(vectors[0], doc), abs_tol=1e-4)
    assert body["data"][0]["score"] == body["data"][3]["score"]  # one text, one vector
    tokens = [len(_post(server, "/tokenize", {"prompt": t}).json()["tokens"]) for t in [QUERY] + DOCS[:3]]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(tokens)  # each text once
    pairwise = _post(server, "/score", {"text_1": DOCS[:2], "text_2": DOCS[2:]}).json()  # (model optional, as vLLM's)
    assert pairwise["model"] == MODEL
    expected = [_cosine(vectors[1], vectors[3]), _cosine(vectors[2], vectors[4])]
    assert all(math.isclose(d["score"], e, abs_tol=1e-4) for d, e in zip(pairwise["data"], expected))
    one = _post(server, "/v1/score", {"model": MODEL, "text_1": DOCS[1], "text_2": [DOCS[1]]}).json()
    assert math.isclose(one["data"][0]["score"], 1.0, abs_tol=1e-5) and one["data"][0]["score"] <= 1.0


def test_rerank_lists_the_documents_best_first(server):
    vectors = _embeddings(server, [QUERY] + DOCS)
    expected = [_cosine(vectors[0], d) for d in vectors[1:]]
    order = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    embedded = server.metric("embedding_inputs_total")
    r = _post(server, "/v1/rerank", {"model": MODEL, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    assert server.metric("embedding_inputs_total") == embedded  # (its texts are no /v1/embeddings inputs)
    body = r.json()
    assert body["id"].startswith("rerank-") and body["model"] == MODEL
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    for result in results:
        assert math.isclose(result["relevance_score"], expected[result["index"]], abs_tol=1e-4)
        assert result["document"] == {"text": DOCS[result["index"]]}
    ranked = [r["index"] for r in results]
    assert abs(ranked.index(0) - ranked.index(3)) == 1  # the same text, the same score: side by side
    assert ranked[0] in order[:2] and ranked[-1] in order[-2:]
    for path in ("/rerank", "/v2/rerank"):  # vLLM's, Jina's and Cohere's paths: the same answer
        top = _post(server, path, {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}).json()
        assert len(top["results"]) == 2 and all("document" not in r for r in top["results"])
        assert all(expected[r["index"]] >= sorted(expected)[-2] - 1e-4 for r in top["results"])  # the best two


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
    ("/v1/score", {"text_1": "a", "text_2": []}, 400, "text_2"),
    ("/v1/score", {"text_1": "", "text_2": "b"}, 400, "text_1"),
    ("/v1/score", {"text_1": "a", "text_2": ["b", 5]}, 400, "text_2.1"),
    ("/v1/rerank", {"query": "q", "documents": ["a", ["b"]]}, 400, "documents.1"),
    ("/v1/score", {"model": "no-such-model", "text_1": "a", "text_2": "b"}, 404, "model"),
    ("/v1/rerank", {"query": "q", "documents": ["a", ""]}, 400, "documents.1"),
    ("/v1/rerank", {"query": "q", "documents": "a"}, 400, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    ("/v1/rerank", {"query": ["q"], "documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["a", " ".join(["word"] * 3000)]}, 400, "documents.1"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "truncation_side": "up"}, 400, "truncation_side"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["x"]}, 400, "rank_fields"),
    # vLLM's later spellings, sent without text_1 / text_2: named, not "text_1 is required"
    ("/v1/score", {"queries": ["a"], "documents": ["b"]}, 400, "queries"),
    ("/v1/score", {"data_1": "a", "data_2": "b"}, 400, "data_1"),
])
def test_bad_requests_are_openai_style_errors_naming_the_field(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_the_text_limit_counts_the_query_with_the_documents(server):
    r = _post(server, "/v1/rerank", {"query": "q", "documents": [f"d{i}" for i in range(2048)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
    assert "1 (query) + 2048 (documents)" in r.json()["error"]["message"]


def test_a_long_document_is_cut_when_asked(server):
    long = " ".join(["word"] * 3000)
    r = _post(server, "/v1/rerank", {"query": "q", "documents": ["a", long], "truncate_prompt_tokens": 50})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= 1 + 1 + 50
