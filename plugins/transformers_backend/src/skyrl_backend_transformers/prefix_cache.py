"""A prefix cache for the reference engine: KV tensors of token sequences already processed.

Multi-turn rollouts resend the whole conversation every turn; with the previous turn's keys and
values cached, only the new tokens are computed. Entries are keyed by the exact token sequence
whose keys/values they hold, within a namespace (the LoRA adapter and the weight epoch), so a weight
update or another adapter can never be served a stale prefix. Least recently used entries are
evicted beyond a token budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [kv_heads, tokens, head_dim]


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[object, tuple[int, ...]], list[LayerKV]] = OrderedDict()
        self._tokens = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, namespace: object, tokens: list[int]) -> tuple[int, list[LayerKV] | None]:
        """The longest cached prefix of ``tokens`` (at most all but the last token, which must be fed
        to get the next token's logits) and its keys/values sliced to that length."""
        self.stats.queried_tokens += len(tokens)
        best_key, best_len = None, 0
        limit = len(tokens) - 1
        for key in self._entries:
            entry_namespace, cached = key
            if entry_namespace != namespace:
                continue
            common = _common_prefix(cached, tokens, limit)
            if common > best_len:
                best_key, best_len = key, common
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.stats.hit_tokens += best_len
        layers = self._entries[best_key]
        return best_len, [(k[:, :best_len], v[:, :best_len]) for k, v in layers]

    def insert(self, namespace: object, tokens: list[int], layers: list[LayerKV]) -> None:
        if not tokens or len(tokens) > self.max_tokens:
            return
        key = (namespace, tuple(tokens))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        # An entry that is a prefix of the new one is now redundant.
        for old in [k for k in self._entries if k[0] == namespace and tokens[: len(k[1])] == list(k[1])]:
            self._tokens -= len(old[1])
            del self._entries[old]
        self._entries[key] = [(k.clone(), v.clone()) for k, v in layers]
        self._tokens += len(tokens)
        while self._tokens > self.max_tokens and self._entries:
            (_, evicted), _ = self._entries.popitem(last=False)
            self._tokens -= len(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
