"""Canonical parameters to SGLang's, and back: pure functions, no SGLang import.

Two translations live here:

* :func:`translate_sampling` turns canonical :class:`~skyrl_backends.sampling.SamplingParams` into a
  :class:`SGLangSampling`: what ``sglang.Engine.async_generate`` receives, plus what this plugin does
  itself because SGLang cannot in token-in mode (exact stop strings, ``min_new_tokens``, seeded
  sampling, exact log-probabilities when the engine's own are of an altered distribution).
* :func:`engine_kwargs` turns a :class:`~skyrl_backends.config.GeneratorConfig` into the keyword
  arguments of ``sglang.Engine`` (SGLang's ``ServerArgs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.checkpoint import served_dtype
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.sampling import SamplingParams

# SGLang computes top-k log-probabilities for any N; a bound keeps a typo from costing a full
# vocabulary sort per token, and matches what the other backends accept.
MAX_TOP_LOGPROBS = 20

# Canonical config field -> SGLang ServerArgs field (the design's table).
CONFIG_TO_SERVER_ARGS: dict[str, str] = {
    "model": "model_path",
    "dtype": "dtype",
    "seed": "random_seed",
    "inference_engine_tensor_parallel_size": "tp_size",
    "inference_engine_pipeline_parallel_size": "pp_size",
    "inference_engine_data_parallel_size": "dp_size",
    "inference_engine_expert_parallel_size": "ep_size",
    "gpu_memory_utilization": "mem_fraction_static",
    "max_num_batched_tokens": "max_prefill_tokens",
    "max_num_seqs": "max_running_requests",
    "max_model_len": "context_length",
    "enable_prefix_caching": "disable_radix_cache (negated)",
    "enable_lora": "enable_lora",
    "max_lora_rank": "max_lora_rank",
    "max_loras": "max_loras_per_batch",
    "enable_sleep_mode": "enable_memory_saver (GPU only)",
}

# Canonical sampling field -> what SGLang receives (the design's table, extended).
SAMPLING_TO_SGLANG: dict[str, str] = {
    "max_generate_length": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k (-1: all)",
    "min_p": "min_p",
    "repetition_penalty": "plugin: custom logit processor (prompt and response, as HF/vLLM)",
    "stop_token_ids": "stop_token_ids (with ignore_eos, which disables them in SGLang: watched by the plugin)",
    "ignore_eos": "ignore_eos",
    "logprobs: 0": "return_logprob=True",
    "logprobs: N": "return_logprob=True, top_logprobs_num=N",
    "stop": "plugin: streamed, matched by StopStringMatcher, aborted and trimmed",
    "min_new_tokens": "plugin: custom logit processor masks EOS and stop ids",
    "seed": "plugin: custom logit processor samples with a per-sequence generator",
}

# Options the plugin owns: token-in mode is what every hook relies on.
_FORCED_SERVER_ARGS = {"skip_tokenizer_init": True}


@dataclass(frozen=True)
class SGLangSampling:
    """One batch's request to SGLang, and what the plugin must do around it.

    ``sampling_params`` goes to ``async_generate`` as is. ``min_new_tokens`` and ``seed`` are
    enforced by the plugin's logit processor, whose parameters are ``processor_params`` (per-request
    fields such as the EOS ids and the seed are added by the engine). ``rescore_logprobs`` is set when
    the log-probabilities SGLang returns would be of a distribution the processor or a penalty
    changed; the plugin then recomputes them with a teacher-forced prefill of the same weights.
    """

    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stop_strings: tuple[str, ...] = ()
    watched_stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    seed: int | None = None
    processor_params: dict[str, Any] = field(default_factory=dict)
    rescore_logprobs: bool = False

    @property
    def needs_processor(self) -> bool:
        return bool(self.processor_params)

    @property
    def streamed(self) -> bool:
        """Whether the plugin must follow the tokens as they come (to stop the request itself)."""
        return bool(self.stop_strings or self.watched_stop_token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampling_params": dict(self.sampling_params),
            "return_logprob": self.return_logprob,
            "top_logprobs_num": self.top_logprobs_num,
            "stop_strings": list(self.stop_strings),
            "watched_stop_token_ids": list(self.watched_stop_token_ids),
            "min_new_tokens": self.min_new_tokens,
            "seed": self.seed,
            "processor_params": dict(self.processor_params),
            "rescore_logprobs": self.rescore_logprobs,
        }


def translate_sampling(params: SamplingParams) -> SGLangSampling:
    """Translate canonical parameters (``n`` is expanded by the facade and ignored here)."""
    if params.logprobs is not None and params.logprobs > MAX_TOP_LOGPROBS:
        raise SamplingParamsError.out_of_range(
            "logprobs", params.logprobs, f"at most {MAX_TOP_LOGPROBS} on the sglang backend")
    seeded = params.seed is not None and not params.greedy
    sp: dict[str, Any] = {
        "max_new_tokens": params.max_generate_length,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "min_p": float(params.min_p),
        "repetition_penalty": float(params.repetition_penalty),
        "ignore_eos": params.ignore_eos,
        # Token-in mode: SGLang must never trim or rewrite output around stops.
        "no_stop_trim": True,
    }
    watched_ids: tuple[int, ...] = ()
    if params.stop_token_ids:
        if params.ignore_eos:
            # SGLang's ignore_eos disables its stop ids too; the plugin watches them instead.
            watched_ids = tuple(sorted(set(params.stop_token_ids)))
        else:
            sp["stop_token_ids"] = sorted(set(params.stop_token_ids))
    processor: dict[str, Any] = {}
    if params.min_new_tokens:
        processor["min_new_tokens"] = params.min_new_tokens
        processor["stop_token_ids"] = sorted(set(params.stop_token_ids))
        processor["ignore_eos"] = params.ignore_eos
    # Seeds and repetition penalty (SGLang's penalizes only the response, the canonical one prompt
    # and response): the processor draws the token itself from the canonical distribution and leaves
    # SGLang a one-hot choice, so SGLang's own truncation and penalty must then be off.
    self_sample = seeded or params.repetition_penalty != 1.0
    if self_sample:
        processor.update(self_sample=True, seed=params.seed if seeded else None,
                         temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
                         min_p=float(params.min_p), repetition_penalty=float(params.repetition_penalty))
        sp.update(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0)
    return_logprob = params.logprobs is not None
    altered = bool(params.min_new_tokens) or self_sample
    return SGLangSampling(
        sampling_params=sp,
        return_logprob=return_logprob,
        top_logprobs_num=params.logprobs or 0,
        stop_strings=tuple(params.stop),
        watched_stop_token_ids=watched_ids,
        min_new_tokens=params.min_new_tokens,
        seed=params.seed if seeded else None,
        processor_params=processor,
        rescore_logprobs=return_logprob and altered,
    )


def is_cpu(config: GeneratorConfig | None) -> bool:
    """SGLang runs on the CPU only when asked to (``device="cpu"``); "auto" means its GPU path."""
    return config is not None and config.device == "cpu"


def engine_kwargs(config: GeneratorConfig) -> dict[str, Any]:
    """``sglang.Engine`` keyword arguments for ``config``; ``engine_init_kwargs`` are applied last.

    Raises ConfigError for an ``engine_init_kwargs`` entry that would break token-in mode."""
    if config.model is None:
        raise ConfigError("model", "no model given; pass model=PATH (a Hugging Face model folder).")
    kwargs: dict[str, Any] = {
        "model_path": config.model,
        "dtype": served_dtype(config.dtype, config.model),
        "random_seed": config.seed,
        "tp_size": config.inference_engine_tensor_parallel_size,
        "pp_size": config.inference_engine_pipeline_parallel_size,
        "dp_size": config.inference_engine_data_parallel_size,
        "ep_size": config.inference_engine_expert_parallel_size,
        "mem_fraction_static": config.gpu_memory_utilization,
        "max_prefill_tokens": config.max_num_batched_tokens,
        "max_running_requests": config.max_num_seqs,
        "disable_radix_cache": not config.enable_prefix_caching,
        # The plugin's logit processor (min_new_tokens, seeds) needs this switch.
        "enable_custom_logit_processor": True,
        "log_level": "error",
        **_FORCED_SERVER_ARGS,
    }
    if config.max_model_len is not None:
        kwargs["context_length"] = config.max_model_len
    if config.device != "auto":
        kwargs["device"] = config.device
    if not is_cpu(config):
        # torch_memory_saver needs CUDA; without it release/resume cannot free anything.
        kwargs["enable_memory_saver"] = config.enable_sleep_mode
    if config.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank,
                      max_loras_per_batch=config.max_loras, lora_target_modules=["all"])
    extra = dict(config.engine_init_kwargs)
    for key, value in _FORCED_SERVER_ARGS.items():
        if key in extra and extra[key] != value:
            raise ConfigError(f"engine_init_kwargs.{key}",
                              f"must stay {value!r}: the sglang backend runs SGLang in token-in-token-out mode "
                              "and detokenizes with its own tokenizer. Remove it.")
    kwargs.update(extra)
    return kwargs


def check_server_arg_names(user_keys: set[str], valid: set[str]) -> None:
    """Reject ``engine_init_kwargs`` keys that SGLang's ServerArgs lacks, naming the closest one: a
    misspelled option would otherwise surface as a TypeError from deep inside SGLang."""
    from skyrl_backends.errors import closest_match

    for key in sorted(user_keys):
        if key not in valid:
            hint = closest_match(key, valid)
            raise ConfigError(f"engine_init_kwargs.{key}",
                              f"SGLang's ServerArgs has no option {key!r}." + (f" Did you mean {hint!r}?" if hint else ""))
