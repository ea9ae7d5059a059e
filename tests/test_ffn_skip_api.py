"""The `ffn_skip` request extension on both completion routes, with exact usage accounting."""
from __future__ import annotations

MODEL = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": "Tell me a short story about a fox."}]
SKIPPY = {"budget": 0.3, "threshold": 0.9, "warmup_tokens": 0}


def test_chat_budget_skips_and_reports_exact_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0,
                                       extra_body={"ffn_skip": SKIPPY, "ignore_eos": True})
    skip = r.usage.model_extra["ffn_skip"]
    assert skip["total"] == 30 * r.usage.completion_tokens
    assert 0 < skip["skipped"] and 0 < skip["ratio"] <= 0.3
    assert skip["ratio"] == skip["skipped"] / skip["total"]


def test_budget_zero_equals_default_dense_text(client):
    dense = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0)
    zero = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0,
                                          extra_body={"ffn_skip": {"budget": 0.0}})
    assert zero.choices[0].message.content == dense.choices[0].message.content
    assert zero.usage.model_extra["ffn_skip"]["skipped"] == 0


def test_streamed_usage_chunk_carries_ffn_skip(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ffn_skip": SKIPPY, "ignore_eos": True}))
    usage = chunks[-1].usage
    skip = usage.model_extra["ffn_skip"]
    assert usage.completion_tokens == 20 and skip["total"] == 600 and 0 < skip["skipped"] <= 0.3 * 600


def test_skipping_shows_in_per_layer_metrics(server, client):
    def layer_skips():
        return [server.metric("ffn_blocks_skipped_total", f'{{layer="{i}"}}') for i in range(30)]

    before = layer_skips()
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=20, temperature=0,
                                       extra_body={"ffn_skip": SKIPPY, "ignore_eos": True})
    delta = [a - b for a, b in zip(layer_skips(), before)]
    assert sum(delta) == r.usage.model_extra["ffn_skip"]["skipped"]
    assert delta[:4] == [0] * 4 and delta[-4:] == [0] * 4  # cold layers
