"""Tokenizer and chat template, read from the model's own folder (never from a hub)."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, hf_dir: str | Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict]) -> str:
        if not self.has_chat_template:
            # No template: plain "role: content" lines, then the assistant's turn.
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # A template places the special tokens it wants; plain text gets the tokenizer's own (BOS),
        # as the same text sent to /v1/completions does (Gemma 3 answers nonsense without BOS).
        return self.encode(self.render_chat(messages), add_special_tokens=not self.has_chat_template)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprobs (special tokens shown as themselves)."""
        return self._tok.decode([token_id], skip_special_tokens=False)
