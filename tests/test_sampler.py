"""The batched sampler against plain per-row references: the distribution each row draws from, its
penalties, its logprobs, and that a row's token does not depend on the rows beside it."""
from __future__ import annotations

import pytest
import torch

from engine import categorical
from engine.categorical import draw
from engine.penalties import apply_penalties
from engine.sampler import SampleRow, sample
from engine.sampling_params import SamplingParams
from engine.seeded_uniform import seeded_uniform

VOCAB = 500
GRID = 4000  # uniform numbers (j + 0.5) / GRID: each token is drawn for a run of them as long as its probability


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """One row's filtered distribution, written out step by step with a full sort (float64)."""
    x = logits.double() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(min(top_k, x.numel())).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()  # top-p measures the mass min-p kept (as vLLM)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return probs / probs.sum()


SETTINGS = [  # temperature, top_k, top_p, min_p, logit scale (a flat row has a wide nucleus)
    (0.7, 0, 1.0, 0.0, 3.0),
    (1.0, 0, 1.0, 0.1, 3.0),
    (1.0, 40, 1.0, 0.0, 3.0),
    (0.4, 0, 0.9, 0.0, 3.0),  # a nucleus inside the first rung of candidates (16 here) ...
    (1.0, 0, 0.9, 0.0, 3.0),  # ... inside the second (64) ...
    (1.0, 0, 0.95, 0.0, 0.3),  # ... and past both: drawn again over the whole sorted vocabulary
    (1.0, 50, 0.9, 0.05, 3.0),
    (1.0, 0, 0.8, 0.05, 3.0),  # min-p and top-p without top-k: top-p's mass is what min-p kept of the vocabulary
    (1.3, VOCAB + 7, 1.0, 0.0, 1.0),  # top_k past the vocabulary keeps it all
    (2.0, 0, 0.5, 0.0, 0.01),
    (0.5, 3, 0.99, 0.0, 2.0),
]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the sampler's CUDA path runs on CUDA hosts"))])
def device(request):
    return torch.device(request.param)


@pytest.fixture
def few_candidates(monkeypatch):
    monkeypatch.setattr(categorical, "CANDIDATES", (16, 64))  # both redraws at a small vocabulary


def test_every_row_draws_from_its_filtered_distribution(few_candidates, device):
    """Each setting alone (a batch's candidates are as many as its widest row needs, so a row
    beside a large top_k would never take the first rungs); rows of different settings side by
    side: test_a_row_draws_the_same_token_alone_and_in_any_batch."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(VOCAB, generator=gen) * scale for *_, scale in SETTINGS]
    uniform = [(j + 0.5) / GRID for j in range(GRID)]
    nuclei = [int((reference_probs(row, *s[:4]) > 0).sum()) for row, s in zip(rows, SETTINGS) if not s[1] and s[2] < 1]
    assert min(nuclei) <= 16 and any(16 < n <= 64 for n in nuclei) and max(nuclei) > 64  # every rung is taken
    for n, (row, (temperature, top_k, top_p, min_p, _)) in enumerate(zip(rows, SETTINGS)):
        logits = row[None].expand(GRID, -1).to(device, copy=True)
        tokens = draw(logits, [temperature] * GRID, [top_k] * GRID, [top_p] * GRID, [min_p] * GRID, uniform).cpu()
        drawn = torch.bincount(tokens, minlength=VOCAB).double() / GRID
        expected = reference_probs(row, temperature, top_k, top_p, min_p)
        assert drawn.numel() == VOCAB
        assert (drawn[expected == 0] == 0).all(), SETTINGS[n]
        assert (drawn - expected).abs().max() <= 1 / GRID + 1e-6, SETTINGS[n]


@pytest.mark.parametrize("poison", [0.0, float("nan")])
def llama_chain_probs(logits, temperature, top_k, top_p, min_p):
    """One row's distribution as llama.cpp's default chain makes it, step by step with a full sort
    (float64): top-k, top-p (over what top-k kept), min-p, then the temperature over what they kept."""
    x = logits.double()
    if top_k:
        x = x.masked_fill(x < x.topk(min(top_k, x.numel())).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return (x / temperature).masked_fill(probs == 0, float("-inf")).softmax(-1)


LLAMA_CHAIN = [  # temperature, top_k, top_p, min_p, logit scale
    (0.8, 40, 0.95, 0.05, 1.0),  # llama-server's defaults
    (0.5, 0, 0.9, 0.0, 3.0),  # a nucleus cut at temperature 1 and sharpened after
    (1.5, 0, 0.8, 0.05, 3.0),  # min-p after top-p: top-p's mass over the whole vocabulary
    (0.7, 0, 1.0, 0.1, 3.0),
    (1.0, 0, 0.95, 0.0, 0.3),  # past both rungs of candidates
    (2.0, 3, 1.0, 0.0, 2.0),
]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, scale", LLAMA_CHAIN)
def test_a_temperature_last_row_draws_from_llama_cpps_chain(temperature, top_k, top_p, min_p, scale, monkeypatch):
    """`temperature_last` (llama.cpp's /completion): the filters cut the unscaled distribution in
    llama.cpp's order and the temperature scales what they keep; its rows beside rows in vLLM's order
    in one call each draw from their own."""
    from engine import typical

    monkeypatch.setattr(typical, "CANDIDATES", (16, 64))  # the redraws at a small vocabulary
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * scale
    expected = llama_chain_probs(row, temperature, top_k, top_p, min_p)
    if temperature != 1.0 and top_p < 1.0 or min_p and top_p < 1.0:  # where the orders differ, they do here
        assert not torch.allclose(expected, reference_probs(row, temperature, top_k, top_p, min_p), atol=1e-3)
    uniform = [(j + 0.5) / GRID for j in range(GRID)]
    llama = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, temperature_last=True)
    vllm = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [SampleRow(llama if j % 2 == 0 else vllm, [1], [], u) for j, u in enumerate(uniform)]
    out = sample(row[None].expand(GRID, -1).clone(), rows)
    for offset, want in ((0, expected), (1, reference_probs(row, temperature, top_k, top_p, min_p))):
        tokens = torch.tensor([o.token_id for o in out[offset::2]])
        drawn = torch.bincount(tokens, minlength=VOCAB).double() / (GRID // 2)
        assert (drawn[want == 0] == 0).all()
        assert (drawn - want).abs().max() <= 2 / GRID + 1e-6


@pytest.mark.parametrize("poison", [0.0, float("nan")])
def test_draw_writes_every_row_with_a_token_of_the_vocabulary(poison):
    """Every row gets a token id, also a row whose logits are not numbers (a model that overflowed):
    an id past the vocabulary would fail the step, or on CUDA the device."""
    logits = torch.randn(6, 50)
    logits[4] = poison
    tokens = draw(logits, [1.0] * 6, [0, 5, 0, 0, 1, 0], [1.0, 1.0, 0.8, 1.0, 1.0, 0.3], [0.0, 0.0, 0.0, 0.2, 0.0, 0.0],
                  [0.999] * 6)
    assert tokens.dtype == torch.long and ((tokens >= 0) & (tokens < 50)).all()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (4, 1.0), (0, 0.999)])
def test_the_ends_of_the_unit_interval_draw_tokens_with_weight(top_k, top_p, device):
    """u = 0 and the largest u below 1 draw the first and the last token a row may draw, never a
    token of probability 0 beside them."""
    inf = float("inf")
    logits = torch.tensor([[-inf, -inf, 0.0, 1.0, -inf, 0.5, -inf]] * 2, device=device)
    tokens = draw(logits, [1.0] * 2, [top_k] * 2, [top_p] * 2, [0.0] * 2, [0.0, 1.0 - 2.0**-53])
    first, last = (3, 2) if top_k or top_p < 1 else (2, 5)  # in the order the path lays tokens out
    assert tokens.tolist() == [first, last]


def test_a_row_draws_the_same_token_alone_and_in_any_batch(few_candidates):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(SETTINGS), VOCAB, generator=gen) * 2
    columns = [[s[i] for s in SETTINGS] for i in range(4)]
    uniform = [seeded_uniform(7, i) for i in range(len(SETTINGS))]
    together = draw(logits.clone(), *columns, uniform)
    for i in range(len(SETTINGS)):
        alone = draw(logits[i:i + 1].clone(), *[[c[i]] for c in columns], [uniform[i]])
        assert alone.item() == together[i].item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_row_of_tied_logits_draws_the_same_token_alone_and_in_any_batch(few_candidates, dtype):
    """CUDA's logits come in bf16, where equal values are common: topk ordered a run of them its own
    way for each k (the batch's widest row sets it), so a seeded row's token changed with its
    neighbours (58 of 300 draws with top_p 0.9 beside a top_k 700 row)."""
    gen = torch.Generator().manual_seed(2)
    rows = (torch.randn(40, VOCAB, generator=gen) * 3 + 10).to(dtype).float()
    settings = [(0.8, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 5, 0.9, 0.0), (0.7, 0, 0.5, 0.05), (1.0, 17, 1.0, 0.1)]
    beside = [(1.0, 300, 1.0, 0.0), (1.0, 0, 0.95, 0.0), (1.0, 3, 1.0, 0.0)]
    for n, row in enumerate(rows):
        mine = settings[n % len(settings)]
        other = beside[n % len(beside)]
        for j in range(8):
            u = seeded_uniform(n, j)
            alone = draw(row[None].clone(), *[[v] for v in mine], [u])
            pair = draw(torch.stack([row, torch.randn(VOCAB, generator=gen)]), *[[a, b] for a, b in zip(mine, other)],
                        [u, 0.5])
            assert alone.item() == pair[0].item(), (n, j, mine, other)


def test_top_k_keeps_the_tokens_as_likely_as_the_kth():
    """As HF and vLLM: top_k 2 over logits 5, 4, 4, 4 keeps four tokens (it kept two of the three 4s)."""
    row = torch.full((VOCAB,), -5.0)
    row[:4] = torch.tensor([5.0, 4.0, 4.0, 4.0])
    uniform = [(j + 0.5) / GRID for j in range(GRID)]
    tokens = draw(row[None].expand(GRID, -1).clone(), [1.0] * GRID, [2] * GRID, [1.0] * GRID, [0.0] * GRID, uniform)
    drawn = torch.bincount(tokens, minlength=VOCAB).double() / GRID
    expected = reference_probs(row, 1.0, 2, 1.0, 0.0)
    assert set(tokens.tolist()) == {0, 1, 2, 3} and (drawn - expected).abs().max() <= 1 / GRID + 1e-6


def reference_penalties(row, params, prompt, output):
    """The penalties of one row over the whole vocabulary, as HF transformers / vLLM define them
    (the bias first: vLLM's logit-bias processor runs before its penalties)."""
    row = row.clone()
    for token, bias in params.logit_bias.items():
        row[token] += bias
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.numel()).to(row.dtype)
    seen = counts > 0
    seen[torch.tensor(prompt)] = True
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        row = torch.where(seen, torch.where(row > 0, row / r, row * r), row)
    if params.frequency_over_text:  # TGI's: the token's share of the prompt and output together
        text = torch.tensor(prompt + output, dtype=torch.long)
        row -= params.frequency_penalty * torch.bincount(text, minlength=row.numel()).to(row.dtype) / len(text)
        return row
    row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    return row


def test_penalties_match_a_per_row_reference(device):
    gen = torch.Generator().manual_seed(2)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3),
              SamplingParams(frequency_penalty=0.5, presence_penalty=-0.7),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.0, logit_bias={3: 5.0, 499: -100.0}),
              SamplingParams(presence_penalty=2.0), SamplingParams(logit_bias={0: 1.5}),
              SamplingParams(frequency_penalty=1.5, frequency_over_text=True),
              SamplingParams(frequency_penalty=-0.5, repetition_penalty=1.2, frequency_over_text=True)]
    prompts = [[1, 2, 2, 3], [4, 4, 9, 300], [7], [3, 5, 8, 13, 3], [11, 12], [0], [7, 7, 30, 2], [9, 9]]
    outputs = [[5, 6], [9, 9, 9, 17, 450], [7, 7, 8, 8, 8, 200], [], [21, 21, 22], [], [7, 31, 31], []]
    logits = torch.randn(len(params), VOCAB, generator=gen) * 4
    adjusted = logits.to(device, copy=True)
    apply_penalties(adjusted, params, prompts, outputs)
    adjusted = adjusted.cpu()
    for i, p in enumerate(params):
        torch.testing.assert_close(adjusted[i], reference_penalties(logits[i], p, prompts[i], outputs[i]))


def test_sample_greedy_and_drawn_rows_with_logprobs(device):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    rows = [SampleRow(SamplingParams(temperature=0.0, logprobs=2), [1], [], None),
            SampleRow(SamplingParams(temperature=0.9, top_p=0.8, logprobs=0), [1], [], 0.3),
            SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [int(logits[2].argmax())], [], None),
            SampleRow(SamplingParams(temperature=1.2, frequency_penalty=1.0, logprobs=5), [1], [4, 4], 0.9)]
    out = sample(logits.to(device, copy=True), rows)
    assert out[0].token_id == int(logits[0].argmax())
    penalized, best = logits[2].clone(), int(logits[2].argmax())
    penalized[best] = penalized[best] / 2.0 if penalized[best] > 0 else penalized[best] * 2.0
    assert out[2].token_id == int(penalized.argmax()) != best  # the penalty moved the greedy choice
    assert out[2].logprob is None and out[2].top_logprobs is None
    model = torch.log_softmax(logits, dim=-1)  # logprobs are the model's own: before penalties and temperature
    for i, k in [(0, 2), (1, 0), (3, 5)]:
        assert out[i].logprob == pytest.approx(model[i, out[i].token_id].item(), abs=1e-5)
        top = model[i].topk(k) if k else None
        assert [t for t, _ in out[i].top_logprobs] == (top.indices.tolist() if k else [])
        values = [v for _, v in out[i].top_logprobs]
        assert values == sorted(values, reverse=True)
    allowed = reference_probs(logits[1], 0.9, 0, 0.8, 0.0) > 0
    assert allowed[out[1].token_id]


def test_processed_logprobs_are_of_the_distribution_drawn_from_and_other_rows_keep_the_models(device):
    """TGI's logprobs (`logprobs_processed`): after the penalties, the temperature and the filters,
    a filtered-out token at the floor; a greedy row's are its penalized logits'; a row beside them
    that asks for the model's own keeps them."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    settings = [(0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 40, 0.9, 0.05)]
    rows = [SampleRow(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=1.5, logprobs=8,
                                     logprobs_processed=True), [2, 3], [7], 0.4) for t, k, p, m in settings]
    rows.append(SampleRow(SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3, logprobs_processed=True),
                          [int(logits[3].argmax())], [], None))
    rows.append(SampleRow(SamplingParams(temperature=0.8, top_k=5, logprobs=3), [1], [], 0.4))
    out = sample(logits.to(device, copy=True), rows)
    for i, row in enumerate(rows[:4]):
        penalized = reference_penalties(logits[i], row.params, row.prompt_ids, row.output_ids)
        if i < 3:
            expected = reference_probs(penalized, *settings[i]).log().clamp(min=-9999.0)
        else:
            expected = torch.log_softmax(penalized.double(), dim=-1)
        assert out[i].logprob == pytest.approx(expected[out[i].token_id].item(), abs=1e-4)
        assert [v for _, v in out[i].top_logprobs] == pytest.approx(expected.topk(len(out[i].top_logprobs)).values
                                                                     .tolist(), abs=1e-4)
    assert sum(v > -9999.0 for _, v in out[0].top_logprobs) == 5  # top_k 5 keeps five
    model = torch.log_softmax(logits[4], dim=-1)
    assert [v for _, v in out[4].top_logprobs] == pytest.approx(model.topk(3).values.tolist(), abs=1e-5)


def test_a_typical_rows_processed_logprobs_are_of_its_typical_set(device):
    """Typical sampling's rows are filtered once, for the draw: their processed logprobs are of that
    set (the tokens nearest the entropy whose mass reaches typical_p), renormalized at the temperature."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, VOCAB, generator=gen) * 3
    rows = [SampleRow(SamplingParams(temperature=t, typical_p=0.6, logprobs=VOCAB // 2, logprobs_processed=True),
                      [1], [], 0.4) for t in (0.8, 1.2)]
    out = sample(logits.to(device, copy=True), rows)
    for i, t in enumerate((0.8, 1.2)):
        log_p = torch.log_softmax(logits[i].double() / t, dim=-1)
        nearness = (-log_p - -(log_p.exp() * log_p).sum()).abs()
        order = nearness.argsort()
        mass = log_p.exp()[order].cumsum(0)
        kept = order[:int((mass < 0.6).sum()) + 1]
        expected = torch.full_like(log_p, -9999.0)
        expected[kept] = log_p[kept] - torch.logsumexp(log_p[kept], 0)
        assert out[i].logprob == pytest.approx(expected[out[i].token_id].item(), abs=1e-4)
        assert [v for _, v in out[i].top_logprobs] == pytest.approx(
            expected.topk(len(out[i].top_logprobs)).values.tolist(), abs=1e-4)


def test_refused_tokens_are_never_picked_and_other_rows_keep_theirs(device):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    best = logits.argmax(-1).tolist()
    refused = [(best[0],), (best[1], 3, 4), None]
    rows = [SampleRow(SamplingParams(temperature=0.0), [1], [], None, refused=refused[0]),
            SampleRow(SamplingParams(temperature=1.5), [1], [], 0.5, refused=refused[1]),
            SampleRow(SamplingParams(temperature=0.0), [1], [], None)]
    out = sample(logits.to(device, copy=True), rows)
    second = logits[0].clone()
    second[best[0]] = float("-inf")
    assert out[0].token_id == int(second.argmax())  # the next likeliest
    assert out[1].token_id not in refused[1] and out[2].token_id == best[2]


def test_seeded_uniform_is_a_stream_per_seed():
    draws = [seeded_uniform(seed, i) for seed in (0, 1, 2**64 - 1) for i in range(3000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert draws == [seeded_uniform(seed, i) for seed in (0, 1, 2**64 - 1) for i in range(3000)]
    assert len(set(draws)) == len(draws)  # adjacent seeds and indices do not repeat each other
    bins = torch.histc(torch.tensor(draws), bins=10, min=0.0, max=1.0)
    assert ((bins - len(draws) / 10).abs() < 5 * (len(draws) / 10) ** 0.5).all()  # 5 sigma of a fair bin
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            seeded_uniform(seed, 0)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_row_with_logits_that_are_not_finite_gets_an_error_and_the_others_their_tokens(greedy, device):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    logits[1, 7], logits[2, 9] = float("nan"), float("inf")
    params = SamplingParams(temperature=0.0 if greedy else 0.8, top_p=0.9, logprobs=1)
    out = sample(logits.to(device, copy=True), [SampleRow(params, [1], [], None if greedy else 0.5)] * 4)
    assert isinstance(out[1], ValueError) and isinstance(out[2], ValueError)
    allowed = [reference_probs(logits[i], 0.8, 0, 0.9, 0.0) > 0 for i in (0, 3)]
    for i, ok in zip((0, 3), allowed):
        assert out[i].token_id == int(logits[i].argmax()) if greedy else ok[out[i].token_id]


def test_logprobs_are_json_numbers_and_a_nan_the_grammar_hides_fails_no_row():
    """A NaN that a row's grammar mask hid made its logprobs NaN (invalid JSON in a stream, a 500
    without one), then failed the row: logprobs are over the tokens the row may take; a token the
    model rules out (-inf) has vLLM's floor, -9999."""
    import json

    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(6))
    logits[0, 7] = float("nan")
    logits[1, 9:] = float("-inf")  # all but 9 tokens ruled out: its top 50 holds 41 of them
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    allowed[7] = False
    asking = SamplingParams(temperature=0.0, logprobs=VOCAB // 10)
    rows = [SampleRow(asking, [1], [], None, allowed=allowed), SampleRow(asking, [1], [], None),
            SampleRow(SamplingParams(temperature=0.0), [1], [], None, allowed=allowed)]
    out = sample(logits.clone(), rows)
    hidden = logits[0].clone()
    hidden[7] = float("-inf")
    assert out[0].token_id == int(hidden.argmax()) and 7 not in dict(out[0].top_logprobs)
    assert out[2].token_id == int(logits[2].argmax())  # the same NaN-free row without logprobs: a token
    assert min(v for _, v in out[1].top_logprobs) == -9999.0
    json.dumps([out[0].logprob, out[0].top_logprobs, out[1].top_logprobs], allow_nan=False)


def test_a_constrained_rows_logprobs_are_over_the_tokens_its_grammar_allows(device):
    """As vLLM takes them (its grammar's bitmask before its logprobs) and as OpenAI's forced tokens
    read 0: they were the unconstrained model's, their alternatives tokens the schema ruled out."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(8)) * 3
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[10, 11]] = True
    only = torch.zeros(VOCAB, dtype=torch.bool)
    only[12] = True
    asking = SamplingParams(temperature=0.0, logprobs=5)
    out = sample(logits.to(device, copy=True), [SampleRow(asking, [1], [], None, allowed=allowed),
                                                SampleRow(asking, [1], [], None, allowed=only)])
    expected = torch.log_softmax(logits[0, [10, 11]], dim=0)
    top = dict(out[0].top_logprobs)
    assert out[0].token_id in (10, 11) and out[0].logprob == pytest.approx(top[out[0].token_id])
    assert [top[10], top[11]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert sorted(top.values())[:3] == [-9999.0] * 3  # the rest of the five: ruled out
    assert out[1].token_id == 12 and out[1].logprob == pytest.approx(0.0, abs=1e-6)  # a forced token


def test_a_row_its_constraints_leave_no_token_is_told_so():
    """Its logits were reported as not finite, which blamed the model."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(7))
    none = torch.zeros(VOCAB, dtype=torch.bool)
    out = sample(logits, [SampleRow(SamplingParams(temperature=0.0), [1], [], None, allowed=none),
                          SampleRow(SamplingParams(temperature=0.0), [1], [], None)])
    assert isinstance(out[0], ValueError) and "constraints" in str(out[0]) and out[1].token_id >= 0


@pytest.mark.parametrize("ladder", [None, (8, 32), ()])  # (8, 32): cut past both rungs; (): one sort of the row
@pytest.mark.parametrize("temperature, typical_p, scale", [(1.0, 0.95, 3.0), (0.7, 0.5, 3.0), (1.3, 0.2, 1.0),
                                                            (1.0, 0.999, 0.3), (0.5, 0.01, 5.0)])
def test_typical_sampling_keeps_transformers_typical_set(temperature, typical_p, scale, ladder):
    """engine/typical.py against transformers' TypicalLogitsWarper on the temperature's logits: the
    same tokens kept, rows of odd widths, a masked token (a grammar's -inf) never kept; whether a
    row is cut among its nearest tokens or over all of them."""
    from transformers import TypicalLogitsWarper

    from engine.typical import mask_atypical

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, VOCAB + 13, generator=gen) * scale
    logits[1, :40] = float("-inf")
    ours = mask_atypical(logits.clone(), [temperature] * 3, [typical_p] * 3, ladder)
    theirs = TypicalLogitsWarper(typical_p)(None, logits / temperature)
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])  # the kept tokens' logits untouched
    assert not ours[1, :40].isfinite().any() and ours.isfinite().sum(-1).min() >= 1


@pytest.mark.parametrize("ladder", [None, (8, 32), ()])
def test_typical_sets_of_tied_tokens_and_rows_cut_at_different_rungs(ladder):
    """Logits of few distinct values (many tokens equally near the entropy, ties across the rungs)
    and rows whose typical_p differ, so that some are cut among their nearest tokens and others go
    on to the next rung in the same call: each row keeps what transformers' warper keeps for it."""
    from transformers import TypicalLogitsWarper

    from engine.typical import mask_atypical

    gen = torch.Generator().manual_seed(11)
    logits = torch.randint(0, 4, (4, VOCAB), generator=gen).float() * 0.5
    typical_p = [0.05, 0.5, 0.9, 0.999]
    ours = mask_atypical(logits.clone(), [1.0] * 4, typical_p, ladder)
    for row, p in enumerate(typical_p):
        theirs = TypicalLogitsWarper(p)(None, logits[row:row + 1].clone())[0]
        assert torch.equal(ours[row].isfinite(), theirs.isfinite()), p


TYPICAL = [  # temperature, top_k, top_p, min_p, typical_p
    (1.0, 10, 1.0, 0.0, 0.5),
    (0.7, 0, 0.9, 0.05, 0.8),
    (1.3, 40, 0.95, 0.0, 0.95),
    (1.0, 0, 1.0, 0.0, 0.3),
    (0.5, 3, 0.99, 0.0, 0.2),
    (0.01, 10, 0.95, 0.0, 0.95),  # LangChain's TGI example's settings
    (1.0, 0, 1.0, 0.1, 0.9),  # min-p alone
    (1.0, 0, 0.9, 0.0, 0.95),  # top-p alone: its mass over the whole vocabulary, whatever rows are beside it
]


@pytest.mark.parametrize("ladder", [(128, 4096), (8, 32)])  # (8, 32): runs past both rungs, then the whole row
@pytest.mark.parametrize("temperature, top_k, top_p, min_p, typical_p", TYPICAL)
def test_typical_sampling_comes_last_after_the_other_filters(temperature, top_k, top_p, min_p, typical_p, ladder,
                                                              monkeypatch):
    """The typical set of what temperature, top-k, min-p and top-p kept (the engine's filters, the
    reference above), as transformers and TGI apply it last: never a token top-k dropped. Rows of
    mixed settings in one call, and flat rows whose nucleus runs past the candidates."""
    from transformers import TypicalLogitsWarper

    from engine import typical
    from engine.typical import mask_filtered

    monkeypatch.setattr(typical, "CANDIDATES", ladder)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, VOCAB, generator=gen) * torch.tensor([[3.0], [3.0], [0.3], [1.0]])
    ours = mask_filtered(logits.clone(), [temperature] * 4, [top_k] * 4, [top_p] * 4, [min_p] * 4, [typical_p] * 4)
    for row in range(4):
        kept_before = reference_probs(logits[row], temperature, top_k, top_p, min_p)
        theirs = TypicalLogitsWarper(typical_p)(None, kept_before.log()[None].float())[0]
        assert torch.equal(ours[row].isfinite(), theirs.isfinite())
        assert ours[row].isfinite().sum() >= 1 and not ours[row][kept_before == 0].isfinite().any()


@pytest.mark.parametrize("ladder", [(128, 4096), (8, 32)])
def test_typical_rows_of_different_settings_in_one_call_keep_what_each_keeps_alone(ladder, monkeypatch):
    """A row's filters are its own: a min-p row beside a top-p row renormalises only itself (its
    neighbour's nucleus measured over the whole vocabulary still), a top-k beside them."""
    from engine import typical
    from engine.typical import mask_filtered

    monkeypatch.setattr(typical, "CANDIDATES", ladder)
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(len(TYPICAL), VOCAB, generator=gen) * 2.5
    settings = [list(column) for column in zip(*TYPICAL)]
    together = mask_filtered(logits.clone(), *settings)
    for row, one in enumerate(TYPICAL):
        alone = mask_filtered(logits[row:row + 1].clone(), *[[value] for value in one])
        assert torch.equal(together[row].isfinite(), alone[0].isfinite()), one


def test_typical_rows_take_equal_logits_in_the_order_of_their_ids_whatever_the_batch():
    """Tied logits (bf16 logits tie often): a cut through them keeps the lowest ids, as
    engine/categorical.py takes them, alone and beside a row whose top-k widens the candidates."""
    from engine.typical import mask_filtered

    logits = torch.full((2, 1000), -5.0)
    tied = torch.tensor([37, 44, 209, 264, 500, 561, 675, 719, 775, 947])
    logits[0, tied] = 5.0
    logits[1] = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    row = ([1.0], [0], [0.3], [0.0], [0.999])
    alone = mask_filtered(logits[:1].clone(), *row)[0].isfinite().nonzero().flatten().tolist()
    beside = mask_filtered(logits.clone(), [1.0, 1.0], [0, 300], [0.3, 1.0], [0.0, 0.0], [0.999, 0.9])
    assert alone == beside[0].isfinite().nonzero().flatten().tolist() == tied[:len(alone)].tolist()
    assert 1 < len(alone) < len(tied)


def test_a_typical_row_draws_only_from_its_filtered_set_and_its_neighbours_keep_theirs(device):
    from engine.typical import mask_filtered

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    kept = mask_filtered(logits[:1].to(device, copy=True), [0.8], [10], [0.95], [0.0], [0.5])[0].isfinite().cpu()
    assert 1 < int(kept.sum()) < 10  # a real filter: inside the top 10, not all of them
    assert set(kept.nonzero().flatten().tolist()) <= set(logits[0].topk(10).indices.tolist())
    drawn = set()
    for u in torch.linspace(0.001, 0.999, 60).tolist():
        rows = [SampleRow(SamplingParams(temperature=0.8, top_k=10, top_p=0.95, typical_p=0.5), [1], [], u),
                SampleRow(SamplingParams(temperature=0.0), [1], [], None),
                SampleRow(SamplingParams(temperature=0.8, top_k=10), [1], [], u)]
        out = sample(logits.to(device, copy=True), rows)
        assert kept[out[0].token_id]
        drawn.add(out[0].token_id)
        assert out[1].token_id == int(logits[1].argmax())
        alone = sample(logits[2:].to(device, copy=True), [SampleRow(SamplingParams(temperature=0.8, top_k=10),
                                                                    [1], [], u)])
        assert out[2].token_id == alone[0].token_id  # the row beside it draws as it would alone
    assert len(drawn) > 1
