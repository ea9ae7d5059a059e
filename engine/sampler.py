"""Turns a step's logits into tokens: penalties, logit bias, greedy or seeded sampling (with
typical sampling where a row asks for it, and llama.cpp's chain, the filters before the temperature,
where a row takes it: engine/typical.py), logprobs,
for all rows at once; the host reads the step's tokens (and logprobs) back in one transfer each."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.categorical import draw
from engine.penalties import apply_penalties
from engine.rows import column, device_values, padded, put_rows, take_rows, to_device
from engine.sampling_params import SAMPLING_EPS, InvalidParamError, SamplingParams
from engine.typical import mask_filtered


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    uniform: float | None  # the row's random draw in [0, 1) (None for greedy rows)
    allowed: torch.Tensor | None = None  # [V] bool on the CPU: the only tokens its grammar lets it take
    refused: tuple[int, ...] | None = None  # tokens it may not take (the ending ones before min_tokens)
    listed: torch.Tensor | None = None  # [V] bool on the CPU: its allowed_token_ids (listed_tokens)


@dataclass
class Sampled:
    token_id: int
    # the model's logprob of token_id over the tokens it may take (when asked; a `logprobs_processed`
    # row's: of the distribution it was drawn from)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled | ValueError]:
    """logits: [B, V] float32, one row per entry of `rows`; the sampler works in them (the
    caller's copy is spent). A row with a NaN or a +inf among its logits (a model that overflowed)
    gets an error in its place: no token could be drawn from them."""
    params = [r.params for r in rows]
    # logprobs: the model's own, over the tokens a constrained row's grammar lets it take (vLLM applies its
    # grammar's bitmask before its raw logprobs; OpenAI's tokens a schema forces read 0), before penalties,
    # temperature, allowed_token_ids and min_tokens' refusals (as vLLM's); a row that asks for processed
    # logprobs (TGI's) gets them after all of these and its filters (_process_logprob_rows)
    _mask_outside(logits, rows, "allowed")
    raw = logits.clone() if any(p.logprobs is not None for p in params) else None
    _mask_outside(logits, rows, "listed")
    apply_penalties(logits, params, [r.prompt_ids for r in rows], [r.output_ids for r in rows])
    _mask_refused(logits, rows)
    best = logits.max(dim=-1)  # argmax's result (first maximum; NaN wins), 2-3x faster on the CPU
    # a row's maximum is NaN where any logit is and +inf where one is (penalties and bias keep both)
    finite = torch.isfinite(best.values)
    tokens = best.indices  # the greedy rows' tokens
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    cut_first = [i for i in drawn if params[i].temperature_last and _filtered(params[i])]
    typical = [i for i in drawn if params[i].typical_p < 1.0 and not params[i].temperature_last]
    plain = set(typical) | set(cut_first)  # rows whose logits the filters below mask: drawn unfiltered
    if typical:  # every filter, typical sampling's last, over the whole vocabulary; then drawn unfiltered
        put_rows(logits, typical, mask_filtered(take_rows(logits, typical), *_settings(params, typical)))
    if cut_first:  # llama.cpp's chain: the filters on the unscaled logits; then drawn at the temperature, unfiltered
        _, *cuts = _settings(params, cut_first)
        put_rows(logits, cut_first, mask_filtered(take_rows(logits, cut_first), [1.0] * len(cut_first), *cuts,
                                                  min_p_last=True))
    if raw is not None:  # (the typical and cut-first rows' logits are filtered by now)
        _process_logprob_rows(raw, logits, params, plain)
    if drawn:
        put_rows(tokens, drawn, draw(take_rows(logits, drawn), [params[i].temperature for i in drawn],
                                     [0 if i in plain else params[i].top_k for i in drawn],
                                     [1.0 if i in plain else params[i].top_p for i in drawn],
                                     [0.0 if i in plain else params[i].min_p for i in drawn],
                                     [rows[i].uniform for i in drawn]))
    # 1: a token; 0: logits that are no numbers; -1: every token masked (a constraint with no way on)
    usable = torch.where(finite, 1, torch.where(best.values == float("-inf"), -1, 0))
    token_ids, usable = torch.stack([tokens, usable]).tolist()  # one transfer back
    out = [Sampled(token) for token in token_ids]
    if raw is not None:
        _add_logprobs(raw, tokens, params, out)
    return [sampled if ok == 1 else ValueError(NOT_FINITE) if ok == 0 else InvalidParamError(NO_TOKEN_LEFT)
            for sampled, ok in zip(out, usable)]


def _filtered(p: SamplingParams) -> bool:
    """Whether a sampled row's settings cut its distribution (top-k, top-p, min-p, typical)."""
    return bool(p.top_k) or p.top_p < 1.0 or p.min_p > 0.0 or p.typical_p < 1.0


def _settings(params: list[SamplingParams], rows: list[int]) -> tuple[list, ...]:
    """The filters' settings of `rows`: temperature, top_k, top_p, min_p, typical_p."""
    names = ("temperature", "top_k", "top_p", "min_p", "typical_p")
    return tuple([getattr(params[i], name) for i in rows] for name in names)


NOT_FINITE = "the model's logits for this sequence are not finite (NaN or infinity)"
# the request's own settings contradict each other (a 400 for it alone)
NO_TOKEN_LEFT = ("no token may follow here: the request's constraints (its schema or grammar, allowed_token_ids, "
                 "bad_words, min_tokens) allow none of the vocabulary")


def listed_tokens(params: SamplingParams, vocab_size: int) -> torch.Tensor | None:
    """A request's `allowed_token_ids` as a [V] bool mask on the CPU (None: any token), built once
    (its choices share the params)."""
    if params.allowed_token_ids is None:
        return None
    if params.allowed_mask is None:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(params.allowed_token_ids)] = True
        params.allowed_mask = mask
    return params.allowed_mask


def _mask_outside(logits: torch.Tensor, rows: list[SampleRow], field: str) -> None:
    """-inf outside each row's mask `field` where it has one (a NaN there too: no token could take it)."""
    masked = [i for i, r in enumerate(rows) if getattr(r, field) is not None]
    if masked:
        keep = to_device(torch.stack([getattr(rows[i], field) for i in masked]), logits.device)
        put_rows(logits, masked, take_rows(logits, masked).masked_fill_(~keep, float("-inf")))


def _mask_refused(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """-inf for a row's refused tokens (the ending ones before min_tokens)."""
    refusing = [i for i, r in enumerate(rows) if r.refused]
    if refusing:
        logits[device_values(refusing, logits.device)[:, None],
               padded([list(rows[i].refused) for i in refusing], logits)] = float("-inf")


LOWEST_LOGPROB = -9999.0  # vLLM's floor: -inf (a token the model rules out) is no JSON number


def _process_logprob_rows(raw: torch.Tensor, logits: torch.Tensor, params: list[SamplingParams],
                          filtered_already: set[int]) -> None:
    """`raw`'s rows that ask for processed logprobs replaced by the logits their token is drawn from:
    penalized, and for a sampled row scaled by its temperature, with -inf outside what its filters
    keep (a greedy row's are its penalized logits, as TGI's with no warper). `filtered_already`: rows
    whose `logits` the filters have masked (the typical ones)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None and p.logprobs_processed]
    if not rows:
        return
    processed = take_rows(logits, rows).clone()
    drawn = [params[i].temperature >= SAMPLING_EPS for i in rows]
    filtered = [j for j, i in enumerate(rows) if drawn[j] and i not in filtered_already and _filtered(params[i])]
    if filtered:
        put_rows(processed, filtered, mask_filtered(take_rows(processed, filtered),
                                                    *_settings(params, [rows[j] for j in filtered])))
    processed /= column([params[i].temperature if d else 1.0 for i, d in zip(rows, drawn)], processed)
    put_rows(raw, rows, processed)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, width: int, ranked: bool = False):
    """Each row's logprob of its token, with `ranked` its rank (how many tokens are at least as
    likely: 1 for the likeliest, as vLLM counts it; else None) and its `width` most likely
    alternatives, as host lists: (chosen [rows], ranks [rows], top ids [rows][width], top logprobs
    [rows][width])."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp_(min=LOWEST_LOGPROB)
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1).tolist() if ranked else [None] * len(chosen)
    chosen = chosen.squeeze(1).tolist()
    if not width:
        return chosen, ranks, [[]] * len(chosen), [[]] * len(chosen)
    top = logprobs.topk(width, dim=-1)
    return chosen, ranks, top.indices.tolist(), top.values.tolist()


def _add_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams], out: list[Sampled]) -> None:
    """The model's own logprobs (over the tokens a constrained row may take; before penalties and
    temperature), or a row's processed ones (`_process_logprob_rows`), of each asking row's token and
    of its `logprobs` most likely alternatives."""
    asking = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asking:
        return
    chosen, _, top_ids, top_values = token_logprobs(take_rows(logits, asking), take_rows(tokens, asking),
                                                 max(params[i].logprobs for i in asking))
    for row, i in enumerate(asking):
        k = params[i].logprobs
        out[i].logprob = chosen[row]
        out[i].top_logprobs = list(zip(top_ids[row][:k], top_values[row][:k])) if k else []
