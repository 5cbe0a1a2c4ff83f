"""Response text for engines behind an engine's own server, decoded on this side.

The servers' token-in/token-out routes return token ids (with integer-keyed log-probabilities); the
text the engine API puts on every completion is decoded here, with the tokenizer of the model folder
the server serves (when this machine can read it), as the in-process backends decode it: special
tokens skipped, and for a completion ended by a stop string, the text cut exactly where that string
ends (:class:`~skyrl_backends.stopping.StopStringMatcher`, the engine API's rule).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from skyrl_backends.stopping import StopStringMatcher

logger = logging.getLogger(__name__)


class ResponseText:
    """Decodes responses with the tokenizer in ``model_dir`` (loaded on first use). Without one
    (the folder is not readable here, or transformers is not installed) completions carry no text."""

    def __init__(self, model_dir: str | None) -> None:
        self.model_dir = model_dir
        self._tokenizer: Any = None
        self._unavailable = model_dir is None or not os.path.isdir(model_dir)

    @property
    def available(self) -> bool:
        return self._load()

    def ends_mid_character(self, prompt: Sequence[int]) -> bool:
        """Whether the prompt's text ends in an incomplete UTF-8 character (a character spans at most
        four byte-level tokens, so the last few tokens decide). Servers prime their detokenizer with
        the prompt, and then match stop strings against text that is not the response's."""
        return self._load() and self.decode(list(prompt[-8:])).endswith("\ufffd")

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def of(self, token_ids: Sequence[int], stop_reason: str | None = None) -> str | None:
        """The text of a response, cut after ``stop_reason`` when a stop string ended it."""
        if not self._load():
            return None
        if stop_reason:
            match = StopStringMatcher([stop_reason], self.decode).feed(list(token_ids))
            if match is not None:
                return match[1]
        return self.decode(token_ids)

    def _load(self) -> bool:
        if self._tokenizer is not None:
            return True
        if self._unavailable:
            return False
        try:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except Exception as exc:  # completions still carry tokens; text is a convenience on top
            logger.warning("no tokenizer for %s (%r): completions carry no text", self.model_dir, exc)
            self._unavailable = True
            return False
        return True


__all__ = ["ResponseText"]
