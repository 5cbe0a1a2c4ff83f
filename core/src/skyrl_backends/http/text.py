"""Text <-> tokens for the endpoint, through the external tokenizer (the engines are token-in,
token-out, as the design runs SGLang with ``skip_tokenizer_init=True``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from skyrl_backends.detokenize import incremental_pieces
from skyrl_backends.http.errors import APIError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (how byte-level BPE spells raw bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TextCodec:
    """Wraps a Hugging Face tokenizer (anything with ``encode``, ``decode`` and
    ``apply_chat_template``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not ids:
            raise APIError(400, f"{param} encodes to no tokens.", param=param)
        return ids

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The chat template applied to ``messages`` (and ``tools``, handed to the template as the
        tokenizer's ``apply_chat_template(tools=...)`` does), as token ids."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "the served model's tokenizer has no chat template; use /v1/completions.",
                           param="messages")
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        if continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # a template may reject a role order, for example
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise APIError(400, "messages encode to no tokens.", param="messages")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes of one token (a token that ends inside a UTF-8 character decodes to
        U+FFFD, but its bytes are exact), for OpenAI's ``bytes`` field."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level:
                table = _byte_level_decoder()
                if all(ch in table for ch in piece):
                    return [table[ch] for ch in piece]
            match = _BYTE_TOKEN.match(piece)
            if match:
                return [int(match.group(1), 16)]
        return list(self.token_text(token_id).encode("utf-8"))

    def pieces(self, ids: Sequence[int], final_text: str) -> list[str]:
        """Per-token text deltas whose concatenation is exactly ``final_text`` (see
        :func:`~skyrl_backends.detokenize.incremental_pieces`)."""
        return incremental_pieces(self.decode, ids, final_text)
