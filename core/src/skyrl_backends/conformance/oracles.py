"""Oracles that never go through the backend under test.

The reference is the same model folder loaded with Hugging Face transformers in float32 on the CPU.
Log-probabilities come from one teacher-forced forward pass over prompt + response; greedy output
comes from a plain decode loop that re-runs the whole sequence every step (no KV cache, no
generation config, nothing shared with any engine). Both implement the canonical semantics written
in :mod:`skyrl_backends.sampling` (repetition penalty, min_new_tokens, stop token ids, EOS).
"""

from __future__ import annotations

import copy
import inspect
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch


@dataclass(frozen=True)
class GreedyResult:
    token_ids: tuple[int, ...]
    finish_reason: str


class ReferenceModel:
    """The float32 reference for one model folder, with variants for other weights and a LoRA
    adapter (each variant is an independent copy of the module).

    ``dtype`` and ``device`` load it otherwise: the consistency measurement
    (:mod:`skyrl_backends.consistency`) runs :meth:`teacher_forced_logprobs` as a trainer would, in
    the trainer's dtype on its device (the result is float32 on the CPU either way). The other
    oracles are meant for the float32 reference on the CPU."""

    def __init__(self, model_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = os.fspath(model_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
        self.vocab_size = int(base.config.vocab_size)
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 2048))
        self.eos_token_ids = _eos_token_ids(base, self.tokenizer)
        self._original_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self._variants: dict[tuple[str, str | None], Any] = {("original", None): base}
        self._weights: dict[str, Mapping[str, torch.Tensor]] = {"original": self._original_state}
        special = set(self.tokenizer.all_special_ids)
        self.ordinary_token_ids = [t for t in range(min(self.vocab_size, len(self.tokenizer))) if t not in special]

    # -- weights ---------------------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """The loaded model with the original weights and no adapter."""
        return self._variants[("original", None)]

    @property
    def original_state(self) -> Mapping[str, torch.Tensor]:
        return self._original_state

    def add_weights(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Register another set of weights (a full or partial state dict over the original)."""
        merged = dict(self._original_state)
        merged.update({k: v.detach().to(self.device, self.dtype).clone() for k, v in state.items()})
        self._weights[name] = merged

    def perturbed_state(self, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
        """Every floating tensor plus seeded noise of ``scale`` times its own spread: different
        enough that greedy output changes, still a working model."""
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for name, tensor in self._original_state.items():
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                state[name] = tensor + scale * tensor.float().std() * noise
            else:
                state[name] = tensor.clone()
        return state

    def _model(self, weights: str = "original", lora: str | None = None) -> Any:
        key = (weights, lora)
        if key not in self._variants:
            module = copy.deepcopy(self._variants[("original", None)])
            if weights != "original":
                module.load_state_dict(self._weights[weights], strict=True)
            if lora is not None:
                from peft import PeftModel

                module = PeftModel.from_pretrained(module, lora).eval()
            self._variants[key] = module
        return self._variants[key]

    # -- oracles ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def teacher_forced_logprobs(self, prompt: Sequence[int], response: Sequence[int], *,
                                weights: str = "original", lora: str | None = None) -> torch.Tensor:
        """``[len(response), vocab]`` log-probabilities of the next token at every response position."""
        if not response:
            return torch.empty(0, self.vocab_size)
        ids = torch.tensor([list(prompt) + list(response)[:-1]], dtype=torch.long, device=self.device)
        logits = self._model(weights, lora)(input_ids=ids).logits[0, len(prompt) - 1:, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @torch.inference_mode()
    def kept_cache_logprobs(self, prompt: Sequence[int], response: Sequence[int], seam: int, *,
                            before: str = "original", after: str) -> torch.Tensor:
        """``[len(response) - seam, vocab]``: what a request kept across a weight update (pause mode
        ``keep``) computes for its tokens from ``seam`` on. Tokens before the seam were chosen by
        the ``before`` weights, whose forward passes left the keys and values of the prompt and of
        ``response[:seam - 1]`` in the cache; from the seam on, the ``after`` weights feed
        ``response[seam - 1:]`` on top of that cache. ``seam`` must be at least 1 (at 0 nothing is
        kept: the whole response is the ``after`` weights' own)."""
        if not 1 <= seam <= len(response):
            raise ValueError(f"seam {seam} outside 1..{len(response)}")
        if seam == len(response):
            return torch.empty(0, self.vocab_size)
        kept = torch.tensor([list(prompt) + list(response)[:seam - 1]], dtype=torch.long)
        past = self._model(before)(input_ids=kept, use_cache=True).past_key_values
        fed = torch.tensor([list(response)[seam - 1:-1]], dtype=torch.long)
        positions = torch.arange(kept.shape[1], kept.shape[1] + fed.shape[1]).unsqueeze(0)
        model = self._model(after)
        # transformers 5 renamed the forward argument past_key_values to cache.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        logits = model(input_ids=fed, position_ids=positions, use_cache=True, **{cache_arg: past}).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, *, stop_token_ids: Iterable[int] = (),
               ignore_eos: bool = False, min_new_tokens: int = 0, repetition_penalty: float = 1.0,
               weights: str = "original", lora: str | None = None) -> GreedyResult:
        """The canonical greedy decode (cached: the reference is deterministic)."""
        return self._greedy(tuple(prompt), max_new_tokens, tuple(sorted(set(stop_token_ids))), ignore_eos,
                            min_new_tokens, float(repetition_penalty), weights, lora)

    @lru_cache(maxsize=4096)  # noqa: B019 - one reference per session; the cache dies with it
    def _greedy(self, prompt: tuple[int, ...], max_new_tokens: int, stop_token_ids: tuple[int, ...],
                ignore_eos: bool, min_new_tokens: int, repetition_penalty: float, weights: str,
                lora: str | None) -> GreedyResult:
        model = self._model(weights, lora)
        tokens: list[int] = []
        stops = set(stop_token_ids)
        enders = stops | (set() if ignore_eos else self.eos_token_ids)
        with torch.inference_mode():
            while len(tokens) < max_new_tokens:
                ids = torch.tensor([list(prompt) + tokens], dtype=torch.long)
                logits = model(input_ids=ids).logits[0, -1, :].float()
                if repetition_penalty != 1.0:
                    seen = torch.tensor(sorted(set(prompt) | set(tokens)))
                    values = logits[seen]
                    logits[seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
                if len(tokens) < min_new_tokens and enders:
                    logits[torch.tensor(sorted(enders))] = float("-inf")
                token = int(torch.argmax(logits))
                tokens.append(token)
                if token in enders:
                    return GreedyResult(tuple(tokens), "stop")
        return GreedyResult(tuple(tokens), "length")

    def greedy_margins(self, prompt: Sequence[int], response: Sequence[int], *, stop_token_ids: Iterable[int] = (),
                       ignore_eos: bool = False, min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                       weights: str = "original", lora: str | None = None) -> list[float]:
        """For each response token, how far it is below the reference's greedy choice at that
        position (in log-probability of the processed distribution), given the response so far;
        0.0 where it is the reference's choice. Same semantics as :meth:`greedy`."""
        if not response:
            return []
        ids = torch.tensor([list(prompt) + list(response)[:-1]], dtype=torch.long)
        enders = set(stop_token_ids) | (set() if ignore_eos else self.eos_token_ids)
        with torch.inference_mode():
            logits = self._model(weights, lora)(input_ids=ids).logits[0, len(prompt) - 1:, :].float().clone()
            for i in range(len(response)):
                if repetition_penalty != 1.0:
                    seen = torch.tensor(sorted(set(prompt) | set(response[:i])))
                    values = logits[i, seen]
                    logits[i, seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
                if i < min_new_tokens and enders:
                    logits[i, torch.tensor(sorted(enders))] = float("-inf")
            lp = torch.log_softmax(logits, dim=-1)
            chosen = lp.gather(-1, torch.tensor(list(response)).unsqueeze(-1)).squeeze(-1)
            return (lp.max(dim=-1).values - chosen).tolist()

    # -- fixtures derived from the model ---------------------------------------------------------
    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def prompts(self, count: int, seed: int, min_len: int = 2, max_len: int = 12) -> list[list[int]]:
        """Deterministic prompts of ordinary (non-special) tokens, of varied lengths."""
        rng = random.Random(seed)
        return [[rng.choice(self.ordinary_token_ids) for _ in range(rng.randint(min_len, max_len))]
                for _ in range(count)]

    @lru_cache(maxsize=8)  # noqa: B019
    def prompt_reaching_eos(self, max_new_tokens: int = 32, candidates: int = 256,
                            seed: int = 7) -> tuple[tuple[int, ...], int] | None:
        """A prompt whose greedy continuation emits EOS after at least two tokens, and that EOS
        position; None if no candidate does. Only a search for a test input: the tests then check
        the engine against :meth:`greedy`, so this may use transformers' own cached decode."""
        if not self.eos_token_ids:
            return None
        rng = random.Random(seed)
        prompts = torch.tensor([[rng.choice(self.ordinary_token_ids) for _ in range(4)] for _ in range(candidates)])
        with torch.inference_mode():
            out = self._model().generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                         max_new_tokens=max_new_tokens, eos_token_id=sorted(self.eos_token_ids),
                                         pad_token_id=self.tokenizer.pad_token_id or 0)
        found = []
        for index, row in enumerate(out[:, prompts.shape[1]:].tolist()):
            hits = [i for i, t in enumerate(row) if t in self.eos_token_ids]
            if hits and hits[0] >= 2:
                found.append((hits[0], index))
        for position, index in sorted(found):
            prompt = tuple(int(t) for t in prompts[index])
            confirmed = self.greedy(prompt, position + 1)
            if confirmed.finish_reason == "stop" and len(confirmed.token_ids) == position + 1:
                return prompt, position
        return None


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def expected_stop_string_cut(tokens: Sequence[int], stop: str, decode: Any) -> tuple[int, str] | None:
    """Where the canonical stop-string rule ends ``tokens``: the smallest k such that the decoded
    text of ``tokens[:k]`` contains ``stop``, and that text cut right after the first occurrence."""
    for k in range(1, len(tokens) + 1):
        text = decode(list(tokens[:k]))
        pos = text.find(stop)
        if pos != -1:
            return k, text[: pos + len(stop)]
    return None
