"""Tokenizer and chat template, read from the model's own folder (never from a hub).

The folder's `tokenizer.json` runs on the `tokenizers` library, and its chat template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`; or the one a user gives
instead, `--chat-template`) is rendered with jinja2
the way transformers' `apply_chat_template` renders it (tests/test_tokenizer.py compares the two
on both embedded models). Transformers itself is not imported (it converts a folder that has only
a slow tokenizer's files): loading its tokenizer classes holds ~90 MB more in a serving process.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2.defaults import DEFAULT_NAMESPACE

from engine.sampling_params import InvalidParamError

# the library's batch calls (`Tokenizer.encode`) would hand each text to its own thread pool, beside
# the decode loop's OpenMP team: one text at a time runs on the calling thread (a user's setting stands)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# a chat rendered as plain "role: content" lines (a model with no template) ends where the model
# goes on to write the next turn's line: a base model goes on with the transcript
PLAIN_CHAT_TURNS = ("\nuser:", "\nassistant:", "\nsystem:")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# what the renderer passes to a template itself; a request's own variables may not replace them
# (and jinja's own globals: range, namespace, ...)
TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "tools", "documents", "raise_exception",
                            "strftime_now", *SPECIAL_TOKENS, *DEFAULT_NAMESPACE})


@dataclass(frozen=True)
class ChatOptions:
    """How a chat's messages become a prompt: open a new assistant turn after them
    (`add_generation_prompt`), or leave the final message open for the model to continue it
    (`continue_final_message`: its text ends the prompt, no end-of-turn after it); `variables`:
    more names the template may read (e.g. a flag some templates take); `documents`: what RAG
    templates list (vLLM's; a template that reads none leaves them out); `add_special_tokens`:
    the tokenizer's own special tokens (BOS) added to the rendered text (None: only where the
    model has no template, which places its own)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    variables: dict = field(default_factory=dict)
    documents: list | None = None
    add_special_tokens: bool | None = None

    def __post_init__(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidParamError("continue_final_message continues the final message and add_generation_prompt "
                                    "starts a new one: set at most one", "continue_final_message")
        taken = sorted(TEMPLATE_NAMES & set(self.variables))
        if taken:
            raise InvalidParamError(f"chat_template_kwargs may not set {', '.join(taken)}: the server passes "
                                    "them to the template itself", "chat_template_kwargs")


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    file = folder / "chat_template.jinja"
    if file.exists():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _spaced(content: str) -> str:
    """A plain line's content after its role's colon: one space before it, none where it opens with
    whitespace of its own."""
    content = content or ""
    return content if content[:1].isspace() else " " + content


def _known_roles(messages: list[dict], template: str | None) -> list[dict]:
    """OpenAI's `developer` messages (its newer name for the system prompt) as `system` ones, for a
    template that names no developer role (as llama.cpp's server maps them): such a template prints
    the role as an unknown turn and adds its own default system prompt before it (SmolLM2's), or
    refuses it. gpt-oss's (Harmony) has a developer role of its own: there they stay."""
    if "developer" in (template or "") or not any(m["role"] == "developer" for m in messages):
        return messages
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def is_inline_template(value: str) -> bool:
    """Whether a `--chat-template` value is the template itself (it holds Jinja tags), not a file name."""
    return "{{" in value or "{%" in value


def read_chat_template(value: str) -> str:
    """`--chat-template`: the template itself or a file that holds it."""
    if is_inline_template(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat template {value!r}: no such file, and not a Jinja template")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"chat template {value!r}: not a text file (UTF-8)") from None
    if not text.strip():  # (it stood for no template: chats were rendered as plain "role: content" lines)
        raise ValueError(f"chat template {value!r}: the file is empty")
    return text


def _compile(template: str):
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not parse: line {exc.lineno}: {exc.message}") from None


class Tokenizer:
    def __init__(self, hf_dir: str | Path, chat_template: str | None = None):
        """`chat_template`: the user's template (or a file holding it) instead of the model's."""
        from tokenizers import Tokenizer as Backend

        folder = Path(hf_dir)
        if (folder / "tokenizer.json").exists():
            try:
                self._tok = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:  # the library's own message names no file ("Model missing. at line 1 ...")
                raise ValueError(f"{folder / 'tokenizer.json'}: not a tokenizer this reads ({exc})") from None
        else:  # only a slow tokenizer's files: transformers converts them (the one case that imports it)
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self._special = {name: _token(config.get(name)) for name in SPECIAL_TOKENS if config.get(name) is not None}
        eos = self._special.get("eos_token")
        self.eos_token_id = None if eos is None else self._tok.token_to_id(eos)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        template = read_chat_template(chat_template) if chat_template else _chat_template(folder, config)
        self.chat_template = template or None  # its text
        self._template = _compile(template) if template else None
        self.has_chat_template = self._template is not None
        # the stop strings that end a chat's answer: none where a template's tokens end a turn
        self.chat_stops = () if self.has_chat_template else PLAIN_CHAT_TURNS
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._bytes: list[bytes | None] | None = None
        self._bytes_lock = threading.Lock()

    # The library's batch calls, with one text each: its `encode` and `decode` hold Python's GIL for the
    # whole call (a 3.6 MB prompt: 1.9 s in which no other thread, the event loop's included, ran a
    # line), its batch calls let it go, the same tokens (the server calls these from worker threads)
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_spans(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """Each token of `text` as (id, start, stop): the characters of `text` it came from (an added
        special token, as BOS: an empty span)."""
        encoding = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return [(t, start, stop) for t, (start, stop) in zip(encoding.ids, encoding.offsets)]

    def token_string(self, token_id: int) -> str | None:
        """The vocabulary's own spelling of a token (SentencePiece's "▁word", byte-level BPE's
        "Ġword"), as transformers' convert_ids_to_tokens gives it; None past the vocabulary."""
        return self._tok.id_to_token(token_id)

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled `text` (a special one's too), or None where there is none."""
        return self._tok.token_to_id(text)

    def render_chat(self, messages: list[dict], options: ChatOptions = ChatOptions(),
                    tools: list[dict] | None = None) -> str:
        """Raises InvalidParamError (param messages) where the model's template refuses the messages
        (some raise on roles they do not know, or on turns that do not alternate). `tools`: for
        templates that show them (server/hermes_tools.py)."""
        from jinja2 import TemplateError

        add = options.add_generation_prompt
        messages = _known_roles(messages, self.chat_template)
        if not self.has_chat_template:
            if options.variables:
                raise InvalidParamError("this model has no chat template to pass chat_template_kwargs to",
                                        "chat_template_kwargs")
            # No template: plain "role: content" lines, then the assistant's turn ("assistant:", whose
            # answer opens with the space the model writes after it: no second one where it comes back)
            text = "".join(f"{m['role']}:{_spaced(m['content'])}\n" for m in messages) + ("assistant:" if add else "")
        else:
            try:
                text = self._template.render(**options.variables, messages=messages, add_generation_prompt=add,
                                             tools=tools, documents=options.documents, **self._special)
            except TemplateError as exc:
                raise InvalidParamError(f"the model's chat template refused these messages: {exc}",
                                        "messages") from None
            except Exception as exc:  # e.g. a variable of the wrong type for what the template does with it
                raise InvalidParamError(f"the chat template failed on this request: {type(exc).__name__}: {exc}",
                                        "chat_template_kwargs" if options.variables else "messages") from None
        return _open_final_message(text, messages[-1]["content"]) if options.continue_final_message else text

    def encode_chat(self, messages: list[dict], options: ChatOptions = ChatOptions(),
                    tools: list[dict] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, options, tools), self._chat_special(options))

    def chat_spans(self, messages: list[dict], options: ChatOptions = ChatOptions(),
                   tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int, int]]]:
        """The chat's text, and the tokens `encode_chat` gives as `encode_spans` gives them."""
        text = self.render_chat(messages, options, tools)
        return text, self.encode_spans(text, self._chat_special(options))

    def _chat_special(self, options: ChatOptions) -> bool:
        # A template places the special tokens it wants; plain text gets the tokenizer's own (BOS),
        # as the same text sent to /v1/completions does (Gemma 3 answers nonsense without BOS).
        return not self.has_chat_template if options.add_special_tokens is None else options.add_special_tokens

    def decode(self, ids: list[int], clean: bool = True, special: bool = False) -> str:
        """`clean`: with the config's clean-up of spaces (as transformers' decode: /detokenize).
        Generated text goes without it, as vLLM streams it (the clean-up joins text across token
        boundaries, so text already streamed could not take it), and so do echoed prompts and
        logprobs' tokens, which sum to that text. `special`: special tokens' text kept (/detokenize,
        as transformers' decode by default), else left out (generated and echoed text)."""
        text = self._tok.decode_batch([ids], skip_special_tokens=not special)[0]
        return self._clean(text) if clean else text

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprobs (special tokens shown as themselves): the text it adds to
        the decoded text (a part of a character as U+FFFD). Not the token decoded alone: decoders
        that strip a text's leading space (Llama 2's SentencePiece) would take every word's."""
        table = self.token_bytes()
        piece = table[token_id] if token_id < len(table) else None
        if piece is None:
            return self._tok.decode([token_id], skip_special_tokens=False)
        return piece.decode("utf-8", "replace")

    def _clean(self, text: str) -> str:
        """transformers' clean_up_tokenization, where the tokenizer's config asks for it."""
        if not self._clean_up_spaces:
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each token id adds to decoded text (None for special tokens): what constrained
        decoding (engine/structured) matches a grammar against, byte by byte. Built once (the server
        builds it at start, beside its step loop), then shared."""
        with self._bytes_lock:
            if self._bytes is None:
                self._bytes = self._build_token_bytes()
            return self._bytes

    def piece_bytes(self, token_id: int) -> bytes:
        """What token `token_id` adds to decoded text, as bytes (a part of a UTF-8 character where it
        holds one; a special token's own text): logprobs' `bytes`."""
        table = self.token_bytes()
        piece = table[token_id] if token_id < len(table) else None  # a model may have more rows than tokens
        return self._tok.decode([token_id], skip_special_tokens=False).encode() if piece is None else piece

    def _build_token_bytes(self) -> list[bytes | None]:
        decoder = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder is not None else {}
        steps = decoder.get("decoders", [decoder])
        byte_level = any(s.get("type") == "ByteLevel" for s in steps)
        spaces = [s["content"].encode() for s in steps if s.get("type") == "Replace"
                  and s.get("pattern", {}).get("String") == "\u2581"] or \
                 [b" " for s in steps if s.get("type") == "Metaspace"]
        byte_fallback = any(s.get("type") == "ByteFallback" for s in steps)
        to_byte = {c: b for b, c in _byte_level_chars().items()} if byte_level else None
        added = self._tok.get_added_tokens_decoder()
        out: list[bytes | None] = [None] * self.vocab_size
        for text, token_id in self._tok.get_vocab(with_added_tokens=True).items():
            if token_id in added:
                out[token_id] = None if added[token_id].special else text.encode()
            elif to_byte is not None:
                out[token_id] = bytes(to_byte[c] for c in text)
            elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                out[token_id] = bytes([int(text[3:5], 16)])
            else:
                out[token_id] = text.encode().replace("\u2581".encode(), spaces[0]) if spaces else text.encode()
        return out


def _open_final_message(text: str, final: str | None) -> str:
    """The rendered chat cut right after the final message's text (its trailing whitespace left
    out, which tokenizes badly before a continuation): what follows it (an end-of-turn, a new
    turn) is the template's, and the model writes on from there instead."""
    final = (final or "").strip()
    if not final:
        raise InvalidParamError("continue_final_message needs a final message with text to continue", "messages")
    end = text.rfind(final)
    if end < 0:
        raise InvalidParamError("continue_final_message needs a final message whose text the chat template "
                                "renders as it is", "messages")
    return text[:end + len(final)]


def _byte_level_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others for code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
