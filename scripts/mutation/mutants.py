"""The bugs ``make mutation`` injects, one at a time, into a copy of the reference backend.

Each mutant is a bug a backend author could plausibly write, expressed as literal edits of the
reference backend's source (``plugins/transformers_backend/src/skyrl_backend_transformers``). Every
edit's ``old`` text must occur exactly once in its file, so a catalogue that no longer matches the
backend fails loudly (``tests/mutation`` checks it in ``make test``) instead of testing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``file``, a path relative to
    the backend's package folder."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    edits: tuple[Edit, ...]


def _mutant(name: str, bug: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, bug, tuple(Edit(*edit) for edit in edits))


_LOGPROB_LINE = ("        chosen_lp, top = token_logprobs(raw, chosen, top_n) if params.logprobs is not None "
                 "else (None, None)\n")
_STOP_MATCHER = "StopStringMatcher(params.stop, self._decode))"

MUTANTS: tuple[Mutant, ...] = (
    # -- log-probabilities ----------------------------------------------------------------------
    _mutant("logprobs_processed", "log-probabilities of the processed distribution (after penalty, temperature "
                                  "and truncation) instead of the raw model's",
            ("engine.py", _LOGPROB_LINE,
             "        scored = processed if params.greedy else truncate(processed.float(), params)\n"
             + _LOGPROB_LINE.replace("token_logprobs(raw,", "token_logprobs(scored,")),
            ("engine.py", "import apply_repetition_penalty, choose_tokens, token_logprobs\n",
             "import apply_repetition_penalty, choose_tokens, token_logprobs, truncate\n")),
    _mutant("logprob_of_another_token", "the log-probability reported is the likeliest token's, not the chosen one's",
            ("sampler.py", "    chosen_lp = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()\n",
             "    chosen_lp = logprobs.max(dim=-1).values.tolist()\n")),
    _mutant("top_logprobs_after_temperature", "top-N log-probabilities taken after temperature",
            ("engine.py", _LOGPROB_LINE,
             _LOGPROB_LINE + "        if top is not None and not params.greedy:\n"
                             "            top = token_logprobs(raw / params.temperature, chosen, top_n)[1]\n")),
    # -- sampling -------------------------------------------------------------------------------
    _mutant("temperature_ignored", "temperature ignored when sampling",
            ("sampler.py", "    logits = logits / params.temperature\n", "    logits = logits.clone()\n")),
    _mutant("top_k_ignored", "top_k ignored",
            ("sampler.py", "    if params.top_k != -1 and params.top_k < logits.shape[-1]:\n", "    if False:\n")),
    _mutant("top_p_ignored", "top_p ignored",
            ("sampler.py", "    if params.top_p < 1.0:\n", "    if False:\n")),
    _mutant("min_p_ignored", "min_p ignored",
            ("sampler.py", "    if params.min_p > 0.0:\n", "    if False:\n")),
    _mutant("repetition_penalty_response_only", "repetition penalty applied to response tokens only, not the prompt's",
            ("engine.py", "raw, [sequences[i].prompt + sequences[i].tokens for i in live], params.repetition_penalty)",
             "raw, [sequences[i].tokens for i in live], params.repetition_penalty)")),
    _mutant("seed_ignored", "seed ignored (every sample drawn from the global generator)",
            ("engine.py", "        if params.seed is None or params.greedy:\n            return None\n",
             "        if True:\n            return None\n")),
    _mutant("seed_shared_by_batch", "one seeded generator for the whole batch, so a seeded sample depends on "
                                    "the other prompts",
            ("engine.py", "        sequences = [\n            _Sequence(rid, list(prompt), self._generator(params), ",
             "        shared_generator = self._generator(params)\n        sequences = [\n"
             "            _Sequence(rid, list(prompt), shared_generator, ")),
    _mutant("identical_samples_for_n", "unseeded requests all seeded with 0: the n > 1 samples of a prompt are "
                                       "identical",
            ("engine.py", "        if params.seed is None or params.greedy:\n            return None\n"
                          "        generator = torch.Generator(device=self.device)\n"
                          "        generator.manual_seed(params.seed)\n",
             "        if params.greedy:\n            return None\n"
             "        generator = torch.Generator(device=self.device)\n"
             "        generator.manual_seed(params.seed if params.seed is not None else 0)\n")),
    # -- stop conditions and lengths ------------------------------------------------------------
    _mutant("stop_string_one_token_late", "off by one at a stop string: the output ends one token after the token "
                                          "completing it",
            ("engine.py", "        match = s.stop_matcher.feed(s.tokens)\n",
             "        match = s.stop_matcher.feed(s.tokens[:-1]) if len(s.tokens) > 1 else None\n")),
    _mutant("stop_string_text_not_cut", "the text is not cut where the stop string ends (the whole last token "
                                        "is kept)",
            ("engine.py", "            s.text = match[1]\n", "            s.text = None\n")),
    _mutant("only_first_stop_string", "only the first of several stop strings is honoured",
            ("engine.py", _STOP_MATCHER, "StopStringMatcher(params.stop[:1], self._decode))")),
    _mutant("stop_strings_searched_in_prompt", "stop strings matched against prompt + response text",
            ("engine.py", _STOP_MATCHER,
             "StopStringMatcher(params.stop, lambda ids, p=list(prompt): self._decode(p + ids)))")),
    _mutant("length_off_by_one", "off by one at the length limit: one token more than max_generate_length",
            ("engine.py", "        if len(s.tokens) >= budget:\n", "        if len(s.tokens) > budget:\n")),
    _mutant("length_checked_before_stop", "the length limit checked before stop conditions: a stop token on the "
                                          "last allowed position finishes as 'length'",
            ("engine.py", "    def _check_stop(self, s: _Sequence, token: int, params: SamplingParams, budget: int) "
                          "-> None:\n",
             "    def _check_stop(self, s: _Sequence, token: int, params: SamplingParams, budget: int) -> None:\n"
             "        if len(s.tokens) >= budget:\n            s.finish_reason = \"length\"\n            return\n")),
    _mutant("stop_token_ids_ignored", "stop token ids ignored",
            ("engine.py", "        if token in params.stop_token_ids:\n            s.finish_reason, s.stop_reason",
             "        if False:\n            s.finish_reason, s.stop_reason")),
    _mutant("ignore_eos_ignored", "ignore_eos ignored: EOS always ends the output",
            ("engine.py", "        if token in self.eos_token_ids and not params.ignore_eos:\n",
             "        if token in self.eos_token_ids:\n")),
    _mutant("length_reported_as_stop", "wrong finish reason: 'stop' at the length limit",
            ("engine.py", "            s.finish_reason = \"length\"\n", "            s.finish_reason = \"stop\"\n")),
    _mutant("abort_reported_as_length", "wrong finish reason: 'length' for an aborted request",
            ("engine.py", '                s.finish_reason = "abort"\n',
             '                s.finish_reason = "length"\n')),
    _mutant("min_new_tokens_ignored", "min_new_tokens ignored",
            ("engine.py", "        if params.min_new_tokens == 0:\n            return []\n",
             "        if True:\n            return []\n")),
    _mutant("min_new_tokens_one_short", "off by one at min_new_tokens: stops allowed one token early",
            ("engine.py", "len(sequences[i].tokens) < params.min_new_tokens for i in live",
             "len(sequences[i].tokens) < params.min_new_tokens - 1 for i in live")),
    _mutant("text_with_special_tokens", "response text decoded with special tokens (EOS shows in the text)",
            ("engine.py", "self.tokenizer.decode(ids, skip_special_tokens=True)",
             "self.tokenizer.decode(ids, skip_special_tokens=False)")),
    _mutant("outputs_sorted_by_length", "completions returned sorted by prompt length, not in prompt order",
            ("engine.py", "GenerateOutput([self._completion(s, engine_params) for s in sequences])",
             "GenerateOutput([self._completion(s, engine_params) for s in sorted(sequences, key=lambda s: "
             "len(s.prompt))])")),
    # -- attention context ----------------------------------------------------------------------
    _mutant("decode_attends_last_128", "wrong attention context on long sequences: decoding attends to the last "
                                       "128 positions only",
            ("engine.py", "        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)\n"
                          "        out = self._forward(lora_name, input_ids=ids, attention_mask=mask,",
             "        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)\n"
             "        window = mask.clone()\n        window[:, :-128] = 0\n"
             "        out = self._forward(lora_name, input_ids=ids, attention_mask=window,")),
    _mutant("prompt_truncated_to_128", "wrong attention context on long prompts: only the last 128 prompt tokens "
                                       "are fed",
            ("engine.py", "        suffixes = [prompt[length:] for prompt, (length, _) in zip(prompts, hits)]\n",
             "        suffixes = [prompt[length:][-128:] for prompt, (length, _) in zip(prompts, hits)]\n")),
    _mutant("padding_attended", "left padding attended to in batches of prompts of different lengths",
            ("engine.py", "        ids, mask = ids.to(self.device), mask.to(self.device)\n",
             "        ids, mask = ids.to(self.device), torch.ones_like(mask).to(self.device)\n")),
    _mutant("positions_ignore_padding", "position ids count the left padding",
            ("engine.py", "        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_width:]\n",
             "        positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)[:, past_width:]\n")),
    # -- weights, sleep, caches, adapters -------------------------------------------------------
    _mutant("weight_update_ignored", "weight updates accepted and ignored",
            ("engine.py", "                    params[name].data.copy_(tensor)\n", "                    pass\n")),
    _mutant("weight_update_partial", "partial weight update: the last tensor of every update is dropped",
            ("engine.py", "staged = [(name, tensor.to(self.device)) for name, tensor in named]",
             "staged = [(name, tensor.to(self.device)) for name, tensor in named[:-1]]")),
    _mutant("stale_weights_after_wake", "stale weights after wake: level-1 sleep keeps the copy of its first sleep "
                                        "and wake restores it",
            ("engine.py", '            elif param.device.type != "cpu":\n'
                          '                param.data = param.data.to("cpu")\n',
             '            else:\n                self._host_copies = getattr(self, "_host_copies", {})\n'
             '                self._host_copies.setdefault(id(param), param.data.clone())\n'),
            ("engine.py", "            elif param.device != self.device:\n"
                          "                param.data = param.data.to(self.device)\n",
             '            elif id(param) in getattr(self, "_host_copies", {}):\n'
             "                param.data = self._host_copies[id(param)].clone()\n")),
    _mutant("prefix_cache_kept_on_update", "prefix cache not invalidated by a weight update",
            ("engine.py", "        finally:  # a partly applied streamed update must not be served from the old "
                          "prefixes either\n            self._invalidate_prefixes()\n",
             "        finally:\n            pass\n")),
    _mutant("prefix_cache_shared_by_adapters", "prefix cache shared between the base model and LoRA adapters",
            ("engine.py", "self.prefix_cache.lookup((lora_name, self._weights_epoch), prompt)",
             "self.prefix_cache.lookup((None, self._weights_epoch), prompt)"),
            ("engine.py", "self.prefix_cache.insert((lora_name, self._weights_epoch), tokens,",
             "self.prefix_cache.insert((None, self._weights_epoch), tokens,")),
    _mutant("lora_adapter_ignored", "LoRA adapter loaded but requests naming it served by the base model",
            ("engine.py", "        self.peft_model.set_adapter(lora_name)\n        return self.peft_model\n",
             "        return None\n")),
    # -- abort, pause, streaming ----------------------------------------------------------------
    _mutant("abort_ignored", "abort ignored",
            ("engine.py", "        if request_ids is None:\n            self._abort_epoch += 1\n        else:\n"
                          "            self._aborted.update(request_ids)\n",
             "        return\n")),
    _mutant("abort_all_ignored", "abort of every request (no ids) ignored; aborts by id work",
            ("engine.py", "        if request_ids is None:\n            self._abort_epoch += 1\n",
             "        if request_ids is None:\n            pass\n")),
    _mutant("pause_ignored", "pause_generation ignored: requests keep decoding",
            ("engine.py", "        self._paused = True\n        self._recompute_next_resume = recompute\n"
                          "        while self._running_loops:\n",
             "        self._recompute_next_resume = recompute\n        while False:\n")),
    _mutant("stream_chunks_overlap", "stream chunks not adding up: each repeats the previous chunk's last token",
            ("engine.py", "yield StreamChunk(index, s.tokens[start:],",
             "yield StreamChunk(index, s.tokens[max(start - 1, 0):],")),
    _mutant("stream_logprobs_misaligned", "streamed log-probabilities not those of the chunk's tokens",
            ("engine.py", "s.logprobs[start:] if params.logprobs is not None else None,",
             "s.logprobs[:len(s.tokens) - start] if params.logprobs is not None else None,")),
)
