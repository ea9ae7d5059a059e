"""Fill in the middle: `/v1/completions` with a `suffix` (OpenAI's legacy completions field) asks a
code model for the text between the prompt and the suffix, in the prefix-suffix-middle order
llama.cpp's `/infill` builds: [BOS] FIM_PRE prompt FIM_SUF suffix FIM_MID, the answer being the
middle. The three tokens are found by their spellings in the model's vocabulary (Qwen2.5-Coder's
and CodeGemma's `<|fim_prefix|>`, StarCoder's `<fim_prefix>`, DeepSeek-Coder's and CodeLlama's);
a model with none of them has no such mode, and the request is refused.
"""
from __future__ import annotations

SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder 1/2, Granite code
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama (sentencepiece)
    ("<PRE>", "<SUF>", "<MID>"),
)


def fim_tokens(tokenizer) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) token ids of the first spelling the vocabulary has whole, or None."""
    for spelling in SPELLINGS:
        ids = [tokenizer.token_id(text) for text in spelling]
        if all(i is not None for i in ids):
            return ids[0], ids[1], ids[2]
    return None


def fim_prompt(tokenizer, tokens: tuple[int, int, int], prefix: list[int], suffix: str) -> list[int]:
    """The prompt ids: the tokenizer's leading special tokens (BOS, where it adds one), then
    FIM_PRE prefix FIM_SUF suffix FIM_MID; `prefix` as ids without special tokens."""
    pre, suf, mid = tokens
    lead = tokenizer.encode("", add_special_tokens=True)
    return [*lead, pre, *prefix, suf, *tokenizer.encode(suffix, add_special_tokens=False), mid]
