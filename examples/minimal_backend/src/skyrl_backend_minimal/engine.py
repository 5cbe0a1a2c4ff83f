"""The engine: one model, one token at a time, the whole sequence re-run at every step.

Every forward pass runs on one worker thread, so the event loop stays free to take new requests
and aborts, and concurrent requests interleave step by step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from skyrl_backends import (
    Completion,
    ConfigError,
    GenerateOutput,
    GenerateRequest,
    GeneratorConfig,
    SamplingParams,
    TensorSpec,
    WeightUpdateRequest,
    hookimpl,
)
from skyrl_backends.checkpoint import served_dtype
from transformers import AutoModelForCausalLM, AutoTokenizer


class MinimalEngine:
    def __init__(self, config: GeneratorConfig) -> None:
        # "auto" is the checkpoint's own dtype, as on every backend ("auto" again when not a folder).
        served = served_dtype(config.dtype, config.model)
        dtype = getattr(torch, served) if served != "auto" else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).eval()
        self.vocab_size = self.model.config.vocab_size
        self.max_len = config.max_model_len or self.model.config.max_position_embeddings
        self.eos_token_ids = {self.tokenizer.eos_token_id} - {None}
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.aborted: set[str] = set()
        self.abort_generation = 0  # bumped by "abort everything"

    # -- generation ---------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: SamplingParams) -> GenerateOutput:
        for i, prompt in enumerate(request.prompt_token_ids):
            if max(prompt) >= self.vocab_size or len(prompt) >= self.max_len:
                raise ConfigError(f"prompt_token_ids[{i}]", f"has a token id >= {self.vocab_size} or is longer "
                                                            f"than the model's {self.max_len} positions.")
        completions = await asyncio.gather(*(
            self.generate_one(request_id, prompt, engine_params)
            for request_id, prompt in zip(request.request_ids, request.prompt_token_ids, strict=True)))
        return GenerateOutput(list(completions))

    async def generate_one(self, request_id: str, prompt: list[int], params: SamplingParams) -> Completion:
        tokens: list[int] = []
        logprobs: list[float] = []
        generation = self.abort_generation
        finish_reason = "length"
        limit = min(params.max_generate_length, self.max_len - len(prompt))
        while len(tokens) < limit:
            if request_id in self.aborted or generation != self.abort_generation:
                finish_reason = "abort"
                break
            logits = await asyncio.get_running_loop().run_in_executor(self.worker, self.next_logits, prompt + tokens)
            token = choose_token(logits, params)
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
            if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
                finish_reason = "stop"
                break
        self.aborted.discard(request_id)
        return Completion(
            token_ids=tokens, finish_reason=finish_reason,
            logprobs=logprobs if params.logprobs is not None else None,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            stop_reason=tokens[-1] if finish_reason == "stop" and tokens[-1] in params.stop_token_ids else None)

    @torch.inference_mode()
    def next_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Raw next-token logits (float32) after ``token_ids``: the whole sequence, no cache."""
        return self.model(input_ids=torch.tensor([token_ids])).logits[0, -1].float()

    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        if request_ids is None:
            self.abort_generation += 1
        else:
            self.aborted.update(request_ids)

    # -- weights ------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for name, p in self.model.named_parameters()]

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest) -> None:
        # The facade has checked every tensor against its declared name, shape and dtype, and those
        # against weight_specs(): each copy below fits its parameter, so copying cannot fail halfway.
        await asyncio.get_running_loop().run_in_executor(self.worker, self.copy_weights, request)

    def copy_weights(self, request: WeightUpdateRequest) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in zip(request.names, request.payload, strict=True):
                params[name].copy_(tensor)

    # -- the rest -----------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_engine_version(self) -> str:
        import transformers

        return transformers.__version__

    @hookimpl
    async def skyrl_backends_teardown(self) -> None:
        self.abort_generation += 1
        self.worker.shutdown(wait=True)


def choose_token(logits: torch.Tensor, params: SamplingParams) -> int:
    """Greedy, or a draw after temperature, top-k and top-p (in that order)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k != -1:
        kth_best = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        logits[order[mass_before >= params.top_p]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1))
