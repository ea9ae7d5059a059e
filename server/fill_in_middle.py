"""Fill in the middle: `/v1/completions` with a `suffix` (OpenAI's legacy completions field) asks a
code model for the text between the prompt and the suffix, in the prefix-suffix-middle order
llama.cpp's `/infill` builds: [BOS] FIM_PRE prompt FIM_SUF suffix FIM_MID, the answer being the
middle. The three tokens are found by their spellings in the model's vocabulary (Qwen2.5-Coder's
and CodeGemma's `<|fim_prefix|>`, StarCoder's `<fim_prefix>`, DeepSeek-Coder's and CodeLlama's);
a model with none of them has no such mode, and the request is refused. The answer also ends at
the tokens that end an infill where the vocabulary has them (CodeLlama's `<EOT>`, Qwen's
`<|fim_pad|>` and `<|file_sep|>`, `<|endoftext|>` where an instruct model's eos is another), as
llama.cpp counts them among its ends of generation.
"""
from __future__ import annotations

SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder 1/2, Granite code
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama (sentencepiece)
    ("<PRE>", "<SUF>", "<MID>"),
)
ENDS = ("▁<EOT>", "<EOT>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|endoftext|>", "<file_sep>")


def fim_tokens(tokenizer) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) token ids of the first spelling the vocabulary has whole, or None."""
    for spelling in SPELLINGS:
        ids = [tokenizer.token_id(text) for text in spelling]
        if all(i is not None for i in ids):
            return ids[0], ids[1], ids[2]
    return None


def fim_ends(tokenizer) -> list[int]:
    """The ids of the infill-ending tokens the vocabulary has (see ENDS)."""
    return [i for i in (tokenizer.token_id(text) for text in ENDS) if i is not None]


def leading_specials(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, or none; not those after it)."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def fim_prompt(lead: list[int], tokens: tuple[int, int, int], prefix: list[int], suffix: list[int]) -> list[int]:
    """The prompt ids: `lead` (leading_specials), then FIM_PRE prefix FIM_SUF suffix FIM_MID; the
    prefix and suffix as ids without special tokens."""
    pre, suf, mid = tokens
    return [*lead, pre, *prefix, suf, *suffix, mid]
