"""Hook specifications: the contract between skyrl_backends and a backend plugin.

There are two kinds of hooks, both specified here:

* **Backend hooks** are implemented by the plugin object an entry point in the ``skyrl_backends``
  group points at (usually a module). They describe the backend and create engines. They are
  called without an engine existing, so they must not import the engine at module import time.
* **Engine hooks** are implemented by the engine object that ``skyrl_backends_create_engine``
  returns. Each engine is registered in a plugin manager of its own, so its hooks are called with
  the engine as ``self`` and never see another engine.

pluggy hooks are synchronous. Engine hooks that do I/O are written as ``async def``: pluggy calls
them like any function and gets a coroutine back, which :class:`skyrl_backends.engine.InferenceEngine`
awaits. A synchronous implementation may return a plain value instead; the facade accepts both. All
engine hooks are ``firstresult``: the engine's own implementation answers, and a wrapper plugin
(``wrapper=True``) may still observe or adjust every call.

Implementations may take fewer arguments than a spec lists (so a hook can gain arguments without
breaking plugins); an argument the spec lacks, or a hook name with the ``skyrl_backends_`` prefix that
no spec defines, is rejected when the plugin is loaded, with the plugin's name in the error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from skyrl_backends.capabilities import Capabilities
    from skyrl_backends.config import GeneratorConfig
    from skyrl_backends.sampling import SamplingParams
    from skyrl_backends.types import (
        BackendInfo,
        GenerateOutput,
        GenerateRequest,
        ParallelSizes,
        StreamChunk,
        TensorSpec,
        WeightSyncInitInfo,
        WeightUpdateRequest,
    )

PROJECT = "skyrl_backends"
# The version of the plugin API this core provides: the hook specifications below and the types they
# exchange. It goes up only for a change that breaks existing plugins (a hook removed, an argument or
# a result whose meaning changed); a new optional hook or argument leaves it as it is. A plugin lists
# the versions it was written for in ``BackendInfo.plugin_api_versions``, and discovery skips a plugin
# that does not list this one, saying why.
PLUGIN_API_VERSION = 1
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BackendHookSpecs:
    """Hooks of the backend plugin (the entry point's target)."""

    @hookspec(firstresult=True)
    def skyrl_backends_backend_info(self) -> BackendInfo:
        """Describe the backend: its name, the engine distribution it drives and the engine versions
        it supports. Called at discovery, for every installed plugin, so it must be cheap and must
        not import the engine."""

    @hookspec(firstresult=True)
    def skyrl_backends_capabilities(self, config: GeneratorConfig | None) -> Capabilities:
        """Declare what the backend supports for ``config`` (None: the defaults on this machine).
        Capabilities may depend on the machine (for example no sleep on CPU); they must be true:
        the conformance suite fails a declared capability that does not work."""

    @hookspec(firstresult=True)
    def skyrl_backends_create_engine(self, config: GeneratorConfig) -> Any:
        """Start one engine for ``config`` and return the engine object, whose methods implement the
        engine hooks below. The engine is imported here, not before. Raise
        :class:`~skyrl_backends.errors.ConfigError` for options the engine cannot take."""

    @hookspec(firstresult=True)
    def skyrl_backends_translate_sampling_params(self, params: SamplingParams, config: GeneratorConfig | None) -> Any:
        """Translate canonical sampling parameters into the engine's own format (a dict, the engine's
        own object, or the canonical parameters themselves when the engine consumes those).

        Called by the facade once per engine call, after the capability checks; the result reaches
        the generate hooks as ``engine_params``, so an engine never translates again. ``params.n`` is
        1 there (the facade expands ``n``). Must raise
        :class:`~skyrl_backends.errors.SamplingParamsError` naming any parameter the engine cannot
        honour: nothing is silently dropped. Pure: needs no running engine, so it is unit-testable
        without the engine installed."""


class EngineHookSpecs:
    """Hooks of an engine object (the value ``skyrl_backends_create_engine`` returned).

    The facade checks state and capabilities before calling any of them: a backend never sees a
    request while asleep, a sleep level it does not declare, or an unvalidated weight update.
    """

    @hookspec(firstresult=True)
    def skyrl_backends_generate(self, request: GenerateRequest, engine_params: Any) -> GenerateOutput:
        """Generate for every prompt of ``request`` (async). Return completions in prompt order, with
        ``n`` already expanded by the facade (``request.sampling_params.n == 1``). ``engine_params``
        is what the backend's ``skyrl_backends_translate_sampling_params`` made of
        ``request.sampling_params``, translated once by the facade. A prompt aborted through
        ``skyrl_backends_abort`` returns the tokens generated so far with finish reason ``"abort"``;
        it never raises.

        Weight versions: a backend that declares ``token_versions`` sets each completion's
        ``token_versions``, the version of the weights whose forward pass chose each token (the
        ``version`` of the last ``skyrl_backends_update_named_weights`` applied before that forward;
        0 before any). Others leave it None and the facade stamps the version the request was
        admitted under, which is exact for them because the facade applies no update under their
        requests (see ``skyrl_backends_update_named_weights``)."""

    @hookspec(firstresult=True)
    def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                       engine_params: Any) -> AsyncIterator[StreamChunk]:
        """Generate like ``skyrl_backends_generate`` (same ``engine_params``), handing out tokens as
        they are produced. Optional; implemented only by backends that declare the ``streaming``
        capability (the facade serves the others from ``skyrl_backends_generate``, one chunk per
        completion).

        The implementation is an async generator (``async def ...: ... yield chunk``): pluggy
        returns the generator object, which the facade iterates. Each chunk's ``index`` is the
        prompt's position in ``request``; its ``token_ids`` (and ``logprobs``/``top_logprobs``
        when requested, one entry per token) are new since that prompt's previous chunk. Every
        prompt ends with exactly one chunk carrying its ``completion`` (as ``skyrl_backends_generate``
        would return it, whose ``token_ids`` are that prompt's chunk tokens concatenated): a token
        once handed out is never taken back, so hold back any a stop string might still cut. An
        aborted prompt ends with its partial completion, finish reason ``"abort"``. If the consumer
        stops early, the generator is closed: end the requests it still runs.

        With ``token_versions`` declared, each chunk's ``token_versions`` labels its tokens, and the
        chunks' labels concatenated are the completion's. Hand a token out only once its version is
        known: an engine that reports versions only with a request's end holds back the tokens of a
        request that a weight update overtook, until its final chunk."""

    @hookspec(firstresult=True)
    def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        """Abort the named in-flight requests (None: all) (async). Their generate calls return
        partial output with finish reason ``"abort"``."""

    @hookspec(firstresult=True)
    def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        """Pause generation in ``mode`` (async). Called with ``"keep"`` when the backend declares
        ``native_pause``, and with ``"abort"`` or ``"wait"`` only if it lists them in
        ``Capabilities.pause_modes`` (the facade does them itself otherwise); in every mode the
        facade holds new requests back until resume, so the engine receives none while paused.

        * ``"keep"``: stop between decode steps. In-flight requests stay, with their caches, and
          continue on resume. When this returns no forward pass is running and none starts before
          ``skyrl_backends_resume_generation``, so a weight update applied meanwhile changes no
          token already chosen and every token chosen after resume comes from the new weights.
          With ``recompute=True`` (called only when ``recompute_on_resume`` is declared) the kept
          requests' caches are recomputed with the weights current at resume, before their next
          token: from then on each request continues exactly as a fresh prefill of its prompt and
          tokens so far would under those weights.
        * ``"abort"``: end every in-flight request; each returns its partial output with finish
          reason ``"abort"`` (the facade waits for them to return).
        * ``"wait"``: let every in-flight request run to its end (the facade waits for them).

        An implementation written before modes existed takes neither argument and is called with
        ``"keep"`` only."""

    @hookspec(firstresult=True)
    def skyrl_backends_resume_generation(self) -> None:
        """Resume decoding after ``skyrl_backends_pause_generation`` (async); requests held by
        ``"keep"`` continue from where they stopped (with their caches, or recomputed ones)."""

    @hookspec(firstresult=True)
    def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        """Release the memory of ``tags`` (``"weights"``, ``"kv_cache"``) (async). The facade aborts
        and drains in-flight requests and resets the prefix cache first. At a level at or above the
        declared ``discards_weights_at_level`` the weights may be dropped."""

    @hookspec(firstresult=True)
    def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        """Take back the memory of ``tags`` (async)."""

    @hookspec(firstresult=True)
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        """Name, shape and dtype of every parameter that weight updates may target, in the
        trainer's (Hugging Face) naming. The facade checks updates against this before applying."""

    @hookspec(firstresult=True)
    def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        """Join the trainer's process group for broadcast weight sync (async)."""

    @hookspec(firstresult=True)
    def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        """Load the weights of an already validated request and invalidate the prefix cache (async).
        Validated means: the declared names, shapes and dtypes match ``weight_specs``, and in-process
        tensors (``"tensors"``) match that declaration (their values too with ``check_finite``);
        transported tensors are checked likewise when received through
        ``skyrl_backends.weight_sync.load_named_tensors`` or ``receive_named_tensors``.
        Must be all-or-nothing: if it fails, the previous weights stay in place. The exception is a
        broadcast the trainer sent ``apply="streamed"``, loaded bucket by bucket as it arrives
        (``skyrl_backends.weight_sync.load_named_tensors`` does both); if it fails partway, the
        facade refuses generation until every weight has been pushed again.

        ``version`` is the weight version these weights become (the facade's ``weight_version``
        once the update succeeds). A backend that declares ``token_versions`` labels every token
        chosen from a forward pass that ran after this update with ``version`` and every token
        chosen before it with the previous version, exactly, whether or not generation is paused
        (an engine that cannot load weights between two decode steps pauses itself around the
        update); it adopts ``version`` only when the update succeeded. The facade calls this hook
        of a backend without ``token_versions`` only when no request is in flight. Requests that a
        ``"keep"`` pause holds keep their caches (recomputed on resume if the pause said so); cache
        entries of the old weights are never matched by a request admitted after the update."""

    @hookspec(firstresult=True)
    def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        """Load a PEFT LoRA adapter from ``lora_path`` under ``lora_name`` (async)."""

    @hookspec(firstresult=True)
    def skyrl_backends_load_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                                      request: WeightUpdateRequest, pinned: bool) -> None:
        """Load the LoRA adapter whose tensors ``request`` carries under ``lora_name``, or replace the
        adapter of that name (async). Only called when the backend declares ``lora_from_tensors``
        (the strategies it takes), and with a request the facade validated against ``lora_config``
        (a PEFT ``LoraConfig`` as JSON) and the engine's parameters (:mod:`skyrl_backends.lora`):
        tensors named ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, in the dtype of
        the module's weight. Receive them like a weight update (``request.payload`` for ``"tensors"``,
        else ``skyrl_backends.weight_sync.receive_named_tensors``), every one before the adapter
        changes: if loading fails, the previous adapter of that name (if any) stays in place.
        Requests started after the hook returns use the new adapter; no prefix cached with the old
        one is reused."""

    @hookspec(firstresult=True)
    def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        """Unload the adapter ``lora_name`` (async). Raise LoraAdapterError if it is unknown."""

    @hookspec(firstresult=True)
    def skyrl_backends_reset_prefix_cache(self) -> None:
        """Drop every cached prefix (async)."""

    @hookspec(firstresult=True)
    def skyrl_backends_parallel_sizes(self) -> ParallelSizes:
        """The engine's tensor, pipeline, data and expert parallel sizes."""

    @hookspec(firstresult=True)
    def skyrl_backends_engine_version(self) -> str:
        """The version of the engine this object runs on (for reports)."""

    @hookspec(firstresult=True)
    def skyrl_backends_teardown(self) -> None:
        """Stop the engine and free everything it holds (async). Called once."""


BACKEND_HOOKS = tuple(n for n in vars(BackendHookSpecs) if n.startswith(PROJECT + "_"))
ENGINE_HOOKS = tuple(n for n in vars(EngineHookSpecs) if n.startswith(PROJECT + "_"))
