"""The reference engine: Hugging Face transformers and torch, on CPU or GPU.

It implements every engine hook for real and is meant to be read: a backend author can copy its
shape. Generation is a batched decode loop with a KV cache over left-padded prompts; each forward
pass runs on one worker thread (so torch never competes with itself for the cores and the event
loop stays free), and between steps the loop honours abort and pause. Concurrent ``generate`` calls
interleave step by step. The loop yields after every step, so ``generate`` runs it to the end and
``generate_stream`` hands out each step's tokens as they are chosen.

Weight versions: weight updates run on the same worker thread as the forward passes, so each
forward pass sees one set of weights, and the version it saw labels the tokens chosen from it. A
pause returns once every decode loop is parked between steps; on resume a loop continues with its
cache, or, when the pause asked for recomputation and the weights changed, first re-runs the prefill
of its prompts and tokens so far under the new weights.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from skyrl_backends.checkpoint import module_specs, served_dtype
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.consistency.lm_head import check_lm_head_dtype, use_float32_lm_head
from skyrl_backends.errors import ConfigError, LoraAdapterError, SamplingParamsError
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import StopStringMatcher
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)

from skyrl_backend_transformers.prefix_cache import LayerKV, PrefixCache
from skyrl_backend_transformers.sampler import apply_repetition_penalty, choose_tokens, token_logprobs

logger = logging.getLogger(__name__)
_PAUSE_POLL_S = 0.002
# engine_init_kwargs: attn_implementation goes to from_pretrained; prefix_cache_max_tokens bounds the
# prefix cache; lm_head_dtype "float32" computes the logits in float32 from a half-precision model
# (skyrl_backends.consistency.lm_head), "model" (the default) in the model's dtype.
ENGINE_INIT_KWARGS = ("attn_implementation", "prefix_cache_max_tokens", "lm_head_dtype")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_dir: str) -> torch.dtype:
    served = served_dtype(name, model_dir)
    if served == "auto":  # not a local folder: what transformers reads from its config
        from transformers import AutoConfig

        configured = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
        if isinstance(configured, str):
            configured = getattr(torch, configured, None)
        return configured if isinstance(configured, torch.dtype) else torch.float32
    dtype = getattr(torch, served, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError.out_of_range("dtype", name, "auto, float32, bfloat16 or float16")
    return dtype


@dataclass
class _Sequence:
    """Decoding state of one prompt in a batch."""

    request_id: str
    prompt: list[int]
    generator: torch.Generator | None
    stop_matcher: StopStringMatcher
    tokens: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weight version that chose each token
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None


class TransformersEngine:
    """One model on one device. Hook methods carry the ``skyrl_backends_`` prefix."""

    def __init__(self, config: GeneratorConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.model is None or not os.path.isdir(config.model):
            raise ConfigError("model", f"{config.model!r} is not a local model folder (nothing is downloaded).")
        for name in ("inference_engine_tensor_parallel_size", "inference_engine_pipeline_parallel_size",
                     "inference_engine_data_parallel_size", "inference_engine_expert_parallel_size"):
            if getattr(config, name) != 1:
                raise ConfigError.out_of_range(name, getattr(config, name),
                                               "1 (the transformers backend runs one device per engine)")
        unknown = set(config.engine_init_kwargs) - set(ENGINE_INIT_KWARGS)
        if unknown:
            raise ConfigError("engine_init_kwargs", f"unknown option(s) {sorted(unknown)} for the transformers "
                                                    f"backend; accepted: {', '.join(ENGINE_INIT_KWARGS)}.")
        init_kwargs = dict(config.engine_init_kwargs)
        cache_tokens = int(init_kwargs.pop("prefix_cache_max_tokens", 65536))
        lm_head_dtype = check_lm_head_dtype(init_kwargs.pop("lm_head_dtype", "model"),
                                            "engine_init_kwargs.lm_head_dtype")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=self.dtype, **init_kwargs).to(self.device).eval()
        if lm_head_dtype == "float32":
            use_float32_lm_head(self.model, "engine_init_kwargs.lm_head_dtype")
        self.peft_model: Any = None
        self._lora_params: dict[str, dict[str, torch.nn.Parameter]] = {}  # adapters from tensors, by saved name
        self.max_model_len = config.max_model_len or getattr(self.model.config, "max_position_embeddings", 4096)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # transformers 5.x renamed the forward argument ``past_key_values`` to ``cache``.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # One worker thread: forwards, weight copies and adapter changes never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyrl-transformers")
        self._aborted: set[str] = set()
        self._abort_epoch = 0
        self._closing = False  # set by teardown
        self._paused = False
        # The version of the weights in the model (set on the worker thread, with the weights).
        self._version = 0
        # Decode loops between two parking points (a pause waits until there are none), and the
        # number of resumes that asked for kept caches to be recomputed.
        self._running_loops = 0
        self._quiet: asyncio.Event | None = None
        self._recompute_next_resume = False
        self._recompute_epoch = 0
        self._param_shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._communicator: Any = None
        self.prefix_cache = PrefixCache(cache_tokens) if config.enable_prefix_caching else None
        # Bumped by every weight update: cached prefixes of older weights are never matched again.
        self._weights_epoch = 0
        if config.seed is not None:
            torch.manual_seed(config.seed)

    # -- helpers -------------------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters under the trainer's (Hugging Face) names, hiding peft's wrapping: a LoRA-wrapped
        ``q_proj.weight`` lives at ``q_proj.base_layer.weight`` once an adapter is loaded."""
        params: dict[str, torch.nn.Parameter] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if "lora_" in name:
                continue
            params[name.replace(".base_layer.", ".")] = param
        return params

    # -- generation ----------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: SamplingParams) -> GenerateOutput:
        sequences: list[_Sequence] = []
        async for sequences in self._decode_loop(request, engine_params):
            pass
        return GenerateOutput([self._completion(s, engine_params) for s in sequences])

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                             engine_params: SamplingParams) -> AsyncIterator[StreamChunk]:
        """Each decode step's new token of every sequence; a sequence's last chunk carries its
        completion. Tokens are never held back: every stop condition is decided on the token itself."""
        params = engine_params
        sent = [0] * len(request)
        done = [False] * len(request)
        async for sequences in self._decode_loop(request, params):
            for index, s in enumerate(sequences):
                if done[index]:
                    continue
                start, done[index] = sent[index], s.finish_reason is not None
                if done[index]:
                    yield StreamChunk.final(index, self._completion(s, params), start)
                elif len(s.tokens) > start:
                    sent[index] = len(s.tokens)
                    yield StreamChunk(index, s.tokens[start:],
                                      s.logprobs[start:] if params.logprobs is not None else None,
                                      s.top_logprobs[start:] if params.logprobs else None,
                                      token_versions=TokenVersions.from_per_token(s.versions[start:]))

    async def _decode_loop(self, request: GenerateRequest, params: SamplingParams) -> AsyncIterator[list[_Sequence]]:
        """The decode loop: yields the batch's sequences after every step (each live one a token
        longer, finished ones with their finish reason), until all are finished."""
        too_long = [i for i, p in enumerate(request.prompt_token_ids) if len(p) >= self.max_model_len]
        if too_long:
            raise ConfigError(f"prompt_token_ids[{too_long[0]}]",
                              f"has {len(request.prompt_token_ids[too_long[0]])} tokens; the model's limit "
                              f"(max_model_len) is {self.max_model_len}. Shorten the prompt.")
        vocab = self.model.config.vocab_size
        bad = [(i, t) for i, p in enumerate(request.prompt_token_ids) for t in p if t >= vocab]
        if bad:
            raise ConfigError(f"prompt_token_ids[{bad[0][0]}]", f"token id {bad[0][1]} is outside the vocabulary "
                                                                f"(size {vocab}).")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:  # never generated, and an index error when min_new_tokens bans them
            raise SamplingParamsError.out_of_range("stop_token_ids", list(params.stop_token_ids),
                                                   f"token ids below the vocabulary size ({vocab}); "
                                                   f"{outside[0]} is outside it")
        sequences = [
            _Sequence(rid, list(prompt), self._generator(params), StopStringMatcher(params.stop, self._decode))
            for rid, prompt in zip(request.request_ids, request.prompt_token_ids)
        ]
        epoch = self._abort_epoch
        weights_epoch = self._weights_epoch
        budget = [min(params.max_generate_length, self.max_model_len - len(s.prompt)) for s in sequences]
        self._loop_started()
        try:
            await self._wait_while_paused(sequences, epoch)  # a request sent to a paused engine waits
            if all(s.finish_reason is not None for s in sequences):
                yield sequences
                return
            recompute_epoch = self._recompute_epoch
            logits, cache, mask, version = await self._run(self._prefill, [s.prompt for s in sequences],
                                                           request.lora_name)
            fed = [list(s.prompt) for s in sequences]  # the tokens whose keys/values each cache row holds
            while True:
                self._apply_aborts(sequences, epoch)
                live = [i for i, s in enumerate(sequences) if s.finish_reason is None]
                if live:
                    self._advance(sequences, live, logits, params, budget, version)
                yield sequences
                if all(s.finish_reason is not None for s in sequences):
                    break
                await self._wait_while_paused(sequences, epoch)
                if all(s.finish_reason is not None for s in sequences):
                    yield sequences  # aborted while paused
                    break
                if self._recompute_epoch != recompute_epoch and self._version != version:
                    # Kept across a weight update by a pause that asked for recomputation: rebuild the
                    # cache of every row (prompt and tokens so far) with the weights now loaded.
                    recompute_epoch = self._recompute_epoch
                    fed = [s.prompt + s.tokens for s in sequences]
                    logits, cache, mask, version = await self._run(self._prefill, fed, request.lora_name)
                    continue
                logits, cache, mask, version = await self._step(sequences, fed, cache, mask, request.lora_name)
        finally:
            self._loop_ended()
            self._aborted.difference_update(s.request_id for s in sequences)
        if self.prefix_cache is not None and not self._closing:  # the worker is gone once closing
            await self._run(self._remember_prefixes, fed, cache, mask, request.lora_name, weights_epoch)

    async def _step(self, sequences: list[_Sequence], fed: list[list[int]], cache: Any, mask: torch.Tensor,
                    lora_name: str | None) -> tuple[torch.Tensor, Any, torch.Tensor, int]:
        """Feed every live sequence's last token (finished rows ride along, masked out)."""
        live_rows = [s.finish_reason is None for s in sequences]
        last = [s.tokens[-1] if live else self.pad_token_id for s, live in zip(sequences, live_rows)]
        for row, live in enumerate(live_rows):
            if live:
                fed[row].append(last[row])
        return await self._run(self._decode_step, last, live_rows, cache, mask, lora_name)

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed)
        return generator

    def _apply_aborts(self, sequences: list[_Sequence], epoch: int) -> None:
        for s in sequences:
            if s.finish_reason is None and (self._abort_epoch != epoch or s.request_id in self._aborted):
                s.finish_reason = "abort"

    async def _wait_while_paused(self, sequences: list[_Sequence], epoch: int) -> None:
        if not self._paused:
            return
        self._loop_parked()
        try:
            while self._paused:
                self._apply_aborts(sequences, epoch)
                if all(s.finish_reason is not None for s in sequences):
                    return
                await asyncio.sleep(_PAUSE_POLL_S)
        finally:
            self._loop_started()

    # A pause returns once no decode loop is between two parking points: every token chosen so far
    # is in its sequence, and none is chosen before resume.
    def _loop_started(self) -> None:
        self._running_loops += 1

    def _loop_parked(self) -> None:
        self._running_loops -= 1
        if not self._running_loops and self._quiet is not None:
            self._quiet.set()

    _loop_ended = _loop_parked

    def _advance(self, sequences: list[_Sequence], live: list[int], logits: torch.Tensor,
                 params: SamplingParams, budget: list[int], version: int) -> None:
        """Choose the next token of every live sequence and apply the stop conditions."""
        raw = logits[live].float()
        processed = apply_repetition_penalty(
            raw, [sequences[i].prompt + sequences[i].tokens for i in live], params.repetition_penalty)
        banned = self._banned_until_min_length(params)
        if banned:
            short = torch.tensor([len(sequences[i].tokens) < params.min_new_tokens for i in live])
            if short.any():
                processed = processed.clone()
                rows = short.nonzero().squeeze(-1).to(processed.device)
                processed[rows.unsqueeze(-1), torch.tensor(banned, device=processed.device)] = float("-inf")
        chosen = choose_tokens(processed, params, [sequences[i].generator for i in live])
        top_n = params.logprobs or 0
        chosen_lp, top = token_logprobs(raw, chosen, top_n) if params.logprobs is not None else (None, None)
        for row, i in enumerate(live):
            s = sequences[i]
            token = int(chosen[row])
            s.tokens.append(token)
            s.versions.append(version)
            if chosen_lp is not None:
                s.logprobs.append(chosen_lp[row])
            if top is not None:
                s.top_logprobs.append(top[row])
            self._check_stop(s, token, params, budget[i])

    def _banned_until_min_length(self, params: SamplingParams) -> list[int]:
        if params.min_new_tokens == 0:
            return []
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= self.eos_token_ids
        return sorted(banned)

    def _check_stop(self, s: _Sequence, token: int, params: SamplingParams, budget: int) -> None:
        if token in params.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
            return
        if token in self.eos_token_ids and not params.ignore_eos:
            s.finish_reason = "stop"
            return
        match = s.stop_matcher.feed(s.tokens)
        if match is not None:
            s.finish_reason, s.stop_reason = "stop", match[0]
            s.text = match[1]
            return
        if len(s.tokens) >= budget:
            s.finish_reason = "length"

    def _completion(self, s: _Sequence, params: SamplingParams) -> Completion:
        return Completion(
            token_ids=s.tokens,
            finish_reason=s.finish_reason or "abort",  # type: ignore[arg-type]
            logprobs=s.logprobs if params.logprobs is not None else None,
            top_logprobs=s.top_logprobs if params.logprobs else None,
            text=(s.text if s.text is not None else self._decode(s.tokens)) if params.detokenize else None,
            stop_reason=s.stop_reason,
            request_id=s.request_id,
            token_versions=TokenVersions.from_per_token(s.versions),
        )

    # -- forward passes (run on the worker thread) -------------------------------------------
    def _active_model(self, lora_name: str | None) -> Any:
        if self.peft_model is None:
            return self.model
        if lora_name is None:
            return None  # the caller disables adapters around the forward
        self.peft_model.set_adapter(lora_name)
        return self.peft_model

    @torch.inference_mode()
    def _forward(self, lora_name: str | None, **inputs: Any) -> Any:
        model = self._active_model(lora_name)
        if model is None:
            with self.peft_model.disable_adapter():
                return self.peft_model(**inputs)
        return model(**inputs)

    def _prefill(self, prompts: list[list[int]],
                 lora_name: str | None) -> tuple[torch.Tensor, Any, torch.Tensor, int]:
        """Feed every prompt, reusing cached prefixes. The batch cache is laid out as
        ``[left pad | cached prefix]`` followed by ``[left pad | new tokens]`` per row; the attention
        mask marks the real columns, so positions and attention ignore the padding in between."""
        from transformers import DynamicCache

        hits = [self._lookup_prefix(prompt, lora_name) for prompt in prompts]
        past_width = max(length for length, _ in hits)
        suffixes = [prompt[length:] for prompt, (length, _) in zip(prompts, hits)]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), past_width + width), dtype=torch.long)
        for row, (suffix, (length, _)) in enumerate(zip(suffixes, hits)):
            ids[row, width - len(suffix):] = torch.tensor(suffix)
            mask[row, past_width - length: past_width] = 1
            mask[row, past_width + width - len(suffix):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_width:]
        cache = DynamicCache()
        if past_width:
            self._seed_cache(cache, hits, past_width)
        out = self._forward(lora_name, input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self._cache_arg: cache})
        return out.logits[:, -1, :], cache, mask, self._version

    def _lookup_prefix(self, prompt: list[int], lora_name: str | None) -> tuple[int, list[LayerKV] | None]:
        if self.prefix_cache is None:
            return 0, None
        return self.prefix_cache.lookup((lora_name, self._weights_epoch), prompt)

    def _seed_cache(self, cache: Any, hits: list[tuple[int, list[LayerKV] | None]], width: int) -> None:
        """Fill a fresh batch cache with each row's cached prefix, right-aligned in ``width`` columns."""
        num_layers = self.model.config.num_hidden_layers
        template = next(layers for _, layers in hits if layers is not None)
        for layer in range(num_layers):
            heads, _, dim = template[layer][0].shape
            keys = torch.zeros((len(hits), heads, width, dim), dtype=template[layer][0].dtype, device=self.device)
            values = torch.zeros_like(keys)
            for row, (length, layers) in enumerate(hits):
                if layers is not None:
                    keys[row, :, width - length:] = layers[layer][0]
                    values[row, :, width - length:] = layers[layer][1]
            cache.update(keys, values, layer)

    def _remember_prefixes(self, fed: list[list[int]], cache: Any, mask: torch.Tensor, lora_name: str | None,
                           weights_epoch: int) -> None:
        if weights_epoch != self._weights_epoch:
            return  # the weights changed while this batch ran: its keys/values are of no single model
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for row, tokens in enumerate(fed):
            columns = mask[row].bool()
            if int(columns.sum()) != len(tokens):  # defensive: never cache misaligned keys
                continue
            self.prefix_cache.insert((lora_name, self._weights_epoch), tokens,
                                     [(k[row][:, columns], v[row][:, columns]) for k, v in layers])

    def _decode_step(self, last_tokens: list[int], live_rows: list[bool], cache: Any, mask: torch.Tensor,
                     lora_name: str | None) -> tuple[torch.Tensor, Any, torch.Tensor, int]:
        ids = torch.tensor(last_tokens, dtype=torch.long, device=self.device).unsqueeze(-1)
        # Finished rows still ride along in the batch; their new column is masked out so the cache
        # stays exact for the prefix cache.
        column = torch.tensor(live_rows, dtype=mask.dtype, device=mask.device).unsqueeze(-1)
        mask = torch.cat([mask, column], dim=-1)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        out = self._forward(lora_name, input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self._cache_arg: cache})
        return out.logits[:, -1, :], cache, mask, self._version

    # -- abort and pause -----------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        if request_ids is None:
            self._abort_epoch += 1
        else:
            self._aborted.update(request_ids)

    @hookimpl
    async def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        # Only "keep" is declared: the facade does "abort" and "wait" itself.
        self._paused = True
        self._recompute_next_resume = recompute
        while self._running_loops:
            self._quiet = asyncio.Event()
            await self._quiet.wait()

    @hookimpl
    async def skyrl_backends_resume_generation(self) -> None:
        if self._recompute_next_resume:
            self._recompute_epoch += 1
            self._recompute_next_resume = False
        self._paused = False

    # -- memory --------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        # KV caches live only while a request runs and the facade drains requests before sleep, so
        # the "kv_cache" tag holds nothing here. Weights: level 2 drops them (memory is really
        # freed); level 1 offloads them to host memory when they are on an accelerator, and on the
        # CPU keeps them where they are (nothing is freed, nothing is claimed).
        if "weights" not in tags:
            return
        await self._run(self._release_weights, level)

    def _release_weights(self, level: int) -> None:
        params = self._named_parameters()
        # A second sleep while the weights are already discarded must not record their empty shapes.
        self._param_shapes.update({n: (p.shape, p.dtype) for n, p in params.items()
                                   if not (p.numel() == 0 and n in self._param_shapes)})
        for param in {id(p): p for p in params.values()}.values():
            if level >= 2:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            elif param.device.type != "cpu":
                param.data = param.data.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        if "weights" in tags:
            await self._run(self._restore_weights)

    def _restore_weights(self) -> None:
        for name, param in self._named_parameters().items():
            if param.numel() == 0 and name in self._param_shapes:
                # Discarded at level 2: allocate; the facade refuses to generate until weights arrive.
                shape, dtype = self._param_shapes[name]
                param.data = torch.empty(shape, dtype=dtype, device=self.device)
            elif param.device != self.device:
                param.data = param.data.to(self.device)

    # -- weights -------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        def describe(name: str, param: torch.nn.Parameter) -> tuple[tuple[int, ...], str]:
            shape, dtype = (param.shape, param.dtype)
            if param.numel() == 0 and name in self._param_shapes:  # discarded while asleep
                shape, dtype = self._param_shapes[name]
            return tuple(shape), str(dtype).removeprefix("torch.")

        return module_specs(self._named_parameters().items(), describe)

    @hookimpl
    async def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        from skyrl_backends.weight_sync import make_receiver

        self._communicator = await self._run(make_receiver, init_info, self.device)

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        await self._run(self._load_weights, request, version)

    def _load_weights(self, request: WeightUpdateRequest, version: int) -> None:
        # Every tensor that reaches ``load`` was checked against the request's declaration (by the
        # facade for in-process tensors, by the receiver for transported ones), and the declaration
        # against this engine's parameters, so each copy fits its parameter. Everything is received
        # and staged on the device before the first parameter changes, so a transfer that fails
        # midway leaves the previous weights intact; a streamed broadcast, which the trainer chose
        # to apply bucket by bucket, is the exception the facade guards.
        params = self._named_parameters()

        def load(named: list[tuple[str, torch.Tensor]]) -> None:
            staged = [(name, tensor.to(self.device)) for name, tensor in named]
            with torch.no_grad():
                for name, tensor in staged:
                    params[name].data.copy_(tensor)

        try:
            if request.strategy == "tensors":
                load(list(zip(request.names, request.payload)))
            else:
                from skyrl_backends.weight_sync import load_named_tensors

                load_named_tensors(request, self.device, load, communicator=self._communicator)
            self._version = version  # on the worker thread: the next forward pass runs on these weights
        finally:  # a partly applied streamed update must not be served from the old prefixes either
            self._invalidate_prefixes()

    def _invalidate_prefixes(self) -> None:
        self._weights_epoch += 1
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        await self._run(self._invalidate_prefixes)

    # -- LoRA ----------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        await self._run(self._load_lora, lora_name, lora_path)

    def _load_lora(self, lora_name: str, lora_path: str) -> None:
        from peft import PeftModel

        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.model, lora_path, adapter_name=lora_name)
            else:
                self.peft_model.load_adapter(lora_path, adapter_name=lora_name)
        except Exception as exc:
            raise LoraAdapterError(f"could not load LoRA adapter {lora_name!r} from {lora_path}: {exc}") from exc
        self.peft_model.eval()
        self._invalidate_prefixes()  # adapter names may be reused for different weights

    @hookimpl
    async def skyrl_backends_load_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                                            request: WeightUpdateRequest, pinned: bool) -> None:
        await self._run(self._load_lora_from_tensors, lora_name, lora_config, request)

    def _load_lora_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                request: WeightUpdateRequest) -> None:
        """peft in memory: inject the adapter's layers (or keep those of the adapter it replaces, when
        its targets and rank are the same) and copy the tensors into them. Every tensor is received
        first, so a transfer that fails changes nothing."""
        from peft import LoraConfig

        if request.strategy == "tensors":
            state = dict(zip(request.names, request.payload))
        else:
            from skyrl_backends.weight_sync import receive_named_tensors

            state = dict(receive_named_tensors(request, self.device, self._communicator))
        config = LoraConfig.from_peft_type(**{**lora_config, "inference_mode": True})
        loaded = self.peft_model.peft_config if self.peft_model is not None else {}
        previous = loaded.get(lora_name)
        if previous is not None and not _same_adapter_layers(previous, config):
            self._unload_lora(lora_name)  # other rank or layers: the new adapter's layers replace the old ones
            previous = None
        params = self._lora_params.get(lora_name) if previous is not None else None
        try:
            if params is None:
                if self.peft_model is None:
                    from peft import PeftModel

                    self.peft_model = PeftModel(self.model, config, adapter_name=lora_name)
                elif previous is None:
                    self.peft_model.add_adapter(lora_name, config)
                params = self._lora_params[lora_name] = _adapter_parameters(self.peft_model, lora_name)
                self.peft_model.eval()
            if previous is not None and _scaling(previous) != _scaling(config):
                _set_scaling(self.peft_model, lora_name, config)
            self.peft_model.peft_config[lora_name] = config
        except Exception as exc:
            raise LoraAdapterError(f"could not load LoRA adapter {lora_name!r} from tensors: {exc}") from exc
        unplaced = sorted(set(state) - set(params))
        if unplaced:
            raise LoraAdapterError(f"LoRA adapter {lora_name!r}: the model has no place for {unplaced[:3]}")
        with torch.no_grad():  # straight into the adapter's layers (peft's set_peft_model_state_dict walks the model)
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self._invalidate_prefixes()  # the adapter's cached prefixes were computed with its old weights

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        await self._run(self._unload_lora, lora_name)

    def _unload_lora(self, lora_name: str) -> None:
        self._invalidate_prefixes()
        self._lora_params.pop(lora_name, None)
        remaining = [n for n in self.peft_model.peft_config if n != lora_name]
        if not remaining:
            # Removing the last adapter restores the plain model (and the plain parameter names).
            self.model = self.peft_model.unload()
            self.peft_model = None
        else:
            self.peft_model.delete_adapter(lora_name)

    # -- the rest ------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_parallel_sizes(self) -> ParallelSizes:
        return ParallelSizes()

    @hookimpl
    def skyrl_backends_engine_version(self) -> str:
        import transformers

        return transformers.__version__

    @hookimpl
    async def skyrl_backends_teardown(self) -> None:
        # The facade has aborted and drained the requests in flight (they returned partial output);
        # one still running after its grace period is aborted here and returns after its current
        # step. Waiting for that step happens off the event loop, which other engines share.
        self._abort_epoch += 1
        self._closing = True
        await asyncio.to_thread(self._executor.shutdown, True)
        self.model = None
        self.peft_model = None


def _same_adapter_layers(old: Any, new: Any) -> bool:
    """Whether an adapter of config ``new`` has the layers (targets and rank) of one of ``old``."""
    def targets(config: Any) -> Any:
        value = config.target_modules
        return sorted(value) if isinstance(value, (set, list, tuple)) else value

    return targets(old) == targets(new) and old.r == new.r


def _adapter_parameters(peft_model: Any, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under the names of peft's saved state (what arrives): peft names them
    ``<module>.lora_A.<adapter>.weight``, the saved state leaves the adapter name out."""
    marker = f".{adapter_name}."
    return {name.replace(marker, "."): param for name, param in peft_model.named_parameters()
            if marker in name and ".lora_" in name}


def _scaling(config: Any) -> float:
    return config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)


def _set_scaling(peft_model: Any, adapter_name: str, config: Any) -> None:
    """Bring every LoRA layer's scaling of ``adapter_name`` to ``config`` (alpha / r, or alpha / sqrt(r))."""
    scaling = _scaling(config)
    for module in peft_model.modules():
        layer_scaling = getattr(module, "scaling", None)
        if isinstance(layer_scaling, dict) and adapter_name in layer_scaling:
            layer_scaling[adapter_name] = scaling


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
