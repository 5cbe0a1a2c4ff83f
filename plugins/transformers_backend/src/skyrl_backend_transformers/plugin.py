"""The ``transformers`` backend plugin: the entry point's target.

Importing this module imports neither torch nor transformers; the engine is imported when an engine
is created.
"""

from __future__ import annotations

from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import SamplingParamsError
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import BackendInfo

NAME = "transformers"
SUPPORTED_TRANSFORMERS = ">=4.56,<6"
MAX_TOP_LOGPROBS = 20


@hookimpl
def skyrl_backends_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        engine="transformers",
        supported_versions=SUPPORTED_TRANSFORMERS,
        plugin_api_versions=(1,),
        description="Reference backend on Hugging Face transformers and torch; runs anywhere, CPU included.",
        engine_import="transformers",
        engine_class="skyrl_backend_transformers.engine:TransformersEngine",
    )


@hookimpl
def skyrl_backends_capabilities(config: GeneratorConfig | None) -> Capabilities:
    return Capabilities(
        sleep_levels=(1, 2),
        discards_weights_at_level=2,
        sleep_tags=True,
        lora=True,
        lora_from_tensors=_weight_sync_strategies(),  # adapters arrive like weights, by any strategy
        top_logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        stop_strings=True,
        min_new_tokens=True,
        seeded_sampling=True,
        min_p=True,
        repetition_penalty=True,
        prefix_caching=config.enable_prefix_caching if config is not None else True,
        abort=True,
        native_pause=True,
        # Forward passes and weight updates share one worker thread: each token's version is exact,
        # and a kept request's cache can be rebuilt by a fresh prefill under the new weights.
        recompute_on_resume=True,
        token_versions=True,
        weight_sync_strategies=_weight_sync_strategies(),
        streaming=True,
    )


def _weight_sync_strategies() -> tuple[str, ...]:
    try:
        from skyrl_backends.weight_sync import RECEIVER_STRATEGIES
    except ImportError:  # weight_sync needs torch; without it only in-process tensors work
        return ("tensors",)
    return ("tensors", *RECEIVER_STRATEGIES)


@hookimpl
def skyrl_backends_translate_sampling_params(params: SamplingParams, config: GeneratorConfig | None) -> SamplingParams:
    """The engine consumes canonical parameters as they are; only limits are checked here."""
    if params.logprobs is not None and params.logprobs > MAX_TOP_LOGPROBS:
        raise SamplingParamsError.out_of_range("logprobs", params.logprobs,
                                               f"at most {MAX_TOP_LOGPROBS} on the transformers backend")
    return params


@hookimpl
def skyrl_backends_create_engine(config: GeneratorConfig) -> Any:
    from skyrl_backend_transformers.engine import TransformersEngine

    return TransformersEngine(config)
