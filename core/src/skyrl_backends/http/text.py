"""Text <-> tokens for the endpoint, through the external tokenizer (the engines are token-in,
token-out, as the design runs SGLang with ``skip_tokenizer_init=True``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from skyrl_backends.http.errors import APIError


class TextCodec:
    """Wraps a Hugging Face tokenizer (anything with ``encode``, ``decode`` and
    ``apply_chat_template``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=True))
        if not ids:
            raise APIError(400, "prompt encodes to no tokens.", param="prompt")
        return ids

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "the served model's tokenizer has no chat template; use /v1/completions.",
                           param="messages")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
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

    def pieces(self, ids: Sequence[int], final_text: str) -> list[str]:
        """Per-token text deltas whose concatenation is exactly ``final_text`` (the completion's
        text, which a stop string may have cut inside the last token). A token that ends inside a
        multi-byte character yields an empty delta until the character is complete."""
        pieces: list[str] = []
        emitted = 0
        for end in range(1, len(ids) + 1):
            if end == len(ids):
                pieces.append(final_text[emitted:])
                break
            text = self.decode(ids[:end])
            if text.endswith("\ufffd") or not final_text.startswith(text) or len(text) < emitted:
                pieces.append("")
                continue
            pieces.append(text[emitted:])
            emitted = len(text)
        return pieces
