"""The conformance harness: one event loop, the engines under test and the reference oracle.

Engines are expensive (a GPU engine takes tens of seconds to start), so tests share one engine per
configuration. A test that leaves the shared engine in any state other than clean (asleep, weights
missing, an adapter still loaded, closed, requests still running) or that fails, gets it torn down,
and the next test starts a fresh one: a broken test never poisons the next, and destructive tests
(sleep that discards weights, weight updates) restore what they changed through the API itself.

Every engine runs on the harness's single event loop, for its whole life, since some engines bind
background tasks to the loop they first see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from skyrl_backends.api import create_engine
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import load_config
from skyrl_backends.conformance.config import ConformanceConfig
from skyrl_backends.conformance.oracles import ReferenceModel
from skyrl_backends.discovery import get_backend
from skyrl_backends.engine import InferenceEngine
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, GenerateOutput, TensorSpec, WeightUpdateRequest

T = TypeVar("T")
LORA_SUBDIR = "lora"


class ConformanceHarness:
    def __init__(self, config: ConformanceConfig, loop: asyncio.AbstractEventLoop) -> None:
        if config.model is None:
            raise ValueError("ConformanceHarness needs a resolved model folder")
        self.config = config
        self.loop = loop
        self.backend = get_backend(config.backend)
        # What the backend declares (decides the engine options); through the wire, the suite gates
        # tests on what the remote engine reports instead (see `capabilities`).
        self.declared: Capabilities = capabilities_of(config)
        self._shared: InferenceEngine | None = None
        self._remote_capabilities: Capabilities | None = None
        self._reference: ReferenceModel | None = None
        self._engine_dtype: str | None = None
        self._second_lora: str | None = None

    def for_model(self, model_dir: str) -> ConformanceHarness:
        """A harness of the same backend and options on another model folder, on the same loop
        (its engine started on first use; ``close`` it when done)."""
        return ConformanceHarness(self.config.replace(model=model_dir), self.loop)

    # -- plumbing --------------------------------------------------------------------------------
    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    @property
    def model_dir(self) -> str:
        assert self.config.model is not None
        return self.config.model

    @property
    def lora_dir(self) -> str:
        return os.path.join(self.model_dir, LORA_SUBDIR)

    def second_lora_dir(self) -> str:
        """Another adapter for the same model (the first one's B matrices doubled), written once
        per session, so tests can tell two adapters apart."""
        if self._second_lora is None:
            import shutil
            import tempfile

            from safetensors.torch import load_file, save_file

            target = os.path.join(tempfile.mkdtemp(prefix="skyrl-conformance-"), "lora-doubled")
            shutil.copytree(self.lora_dir, target)
            weights_file = os.path.join(target, "adapter_model.safetensors")
            weights = load_file(weights_file)
            save_file({k: (v * 2 if "lora_B" in k else v).contiguous() for k, v in weights.items()}, weights_file)
            self._second_lora = target
        return self._second_lora

    @property
    def capabilities(self) -> Capabilities:
        """What the engine under test offers: the backend's declaration, or through the wire what
        the remote engine reports (the server's, less what the connection cannot carry)."""
        if self.config.remote or self.config.server:
            if self._remote_capabilities is None:
                self._remote_capabilities = self.engine.capabilities
            return self._remote_capabilities
        return self.declared

    def engine_options(self, **overrides: Any) -> dict[str, Any]:
        options = dict(self.config.engine_options)
        if self.declared.lora:
            options.setdefault("enable_lora", True)
        options.update(overrides)
        return options

    def create(self, **overrides: Any) -> InferenceEngine:
        async def start() -> InferenceEngine:  # created inside the loop it will live on
            if self.config.server:
                from skyrl_backends.remote.native.launch import launch_server

                return launch_server(self.config.backend, self.model_dir, **self.engine_options(**overrides))
            if self.config.remote:
                from skyrl_backends.remote import launch_engine

                return launch_engine(self.config.backend, self.model_dir, **self.engine_options(**overrides))
            return create_engine(self.config.backend, model=self.model_dir, **self.engine_options(**overrides))

        return self.run(start())

    # -- engines ---------------------------------------------------------------------------------
    @property
    def engine(self) -> InferenceEngine:
        """The shared engine (started on first use)."""
        if self._shared is None or self._shared.closed:
            self._shared = self.create()
            if self.config.remote or self.config.server:
                self._remote_capabilities = self._shared.capabilities
        return self._shared

    def shared_engine_is_clean(self) -> bool:
        engine = self._shared
        return (engine is not None and not engine.closed and not engine.asleep_tags and engine.weights_loaded
                and not engine.lora_adapters and engine.num_inflight == 0 and not engine.paused)

    def discard_shared(self) -> None:
        if self._shared is not None:
            engine, self._shared = self._shared, None
            with contextlib.suppress(Exception):
                self.run(engine.teardown())

    def close(self) -> None:
        self.discard_shared()
        if self._second_lora is not None:
            import shutil

            shutil.rmtree(os.path.dirname(self._second_lora), ignore_errors=True)

    # -- the oracle ------------------------------------------------------------------------------
    @property
    def reference(self) -> ReferenceModel:
        if self._reference is None:
            self._reference = ReferenceModel(self.model_dir)
        return self._reference

    @property
    def engine_dtype(self) -> str:
        """The dtype the engine holds its weights in (the most common one among its parameters)."""
        if self._engine_dtype is None:
            specs = list(self.weight_specs().values())
            dtypes = [s.dtype for s in specs]
            self._engine_dtype = max(set(dtypes), key=dtypes.count)
        return self._engine_dtype

    @property
    def logprob_tolerance(self) -> float:
        return self.config.tolerance_for(self.engine_dtype)

    @property
    def greedy_margin(self) -> float:
        return self.config.greedy_margin_for(self.engine_dtype)

    @property
    def context_length(self) -> int:
        """The engine's context in tokens: ``max_model_len`` when the options set it, else the model's."""
        return int(self.config.engine_options.get("max_model_len") or self.reference.max_positions)

    @property
    def long_generation(self) -> int:
        """A response length that takes long enough for an abort or a sleep to land mid-way, within
        the engine's context."""
        return max(64, min(900, self.context_length - 40))

    # -- helpers the tests share -----------------------------------------------------------------
    def weight_specs(self, engine: InferenceEngine | None = None) -> dict[str, TensorSpec]:
        return self.run((engine or self.engine).weight_specs())

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Mapping[str, Any] | None = None,
                 engine: InferenceEngine | None = None, **request_fields: Any) -> GenerateOutput:
        engine = engine or self.engine
        sampling = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params or {})
        return self.run(engine.generate([list(p) for p in prompts], sampling, **request_fields))

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16,
               engine: InferenceEngine | None = None, **params: Any) -> GenerateOutput:
        return self.generate(prompts, {"max_generate_length": max_new_tokens, "temperature": 0.0, **params},
                             engine=engine)

    def weight_update(self, state: Mapping[str, Any], names: Sequence[str] | None = None,
                      engine: InferenceEngine | None = None) -> WeightUpdateRequest:
        """An in-process update carrying ``state``'s tensors for the engine's parameters (all, or
        ``names``), each converted to the dtype the engine holds it in."""
        specs = self.weight_specs(engine)
        chosen = list(names) if names is not None else list(specs)
        missing = [n for n in chosen if n not in state]
        if missing:
            raise KeyError(f"the reference model has no tensor for engine parameter(s) {missing[:5]}; the "
                           f"backend's weight_specs must use the Hugging Face parameter names")
        import torch

        pairs = [(n, state[n].to(getattr(torch, specs[n].dtype)).contiguous()) for n in chosen]
        return WeightUpdateRequest.from_named_tensors(pairs)

    def push_weights(self, state: Mapping[str, Any], names: Sequence[str] | None = None,
                     engine: InferenceEngine | None = None) -> int:
        engine = engine or self.engine
        return self.run(engine.update_named_weights(self.weight_update(state, names, engine)))

    def assert_greedy_parity(self, prompt: Sequence[int], completion: Completion, max_new_tokens: int, *,
                             weights: str = "original", lora: str | None = None, **greedy_params: Any) -> None:
        """The completion is the reference greedy decode: exactly for a float32 engine; otherwise
        every token is the reference argmax given the engine's own prefix, up to the dtype's margin."""
        expected = self.reference.greedy(prompt, max_new_tokens, weights=weights, lora=lora, **greedy_params)
        if self.greedy_margin == 0.0:
            assert tuple(completion.token_ids) == expected.token_ids, (
                f"greedy output differs from the float32 reference decode for prompt {list(prompt)}:\n"
                f"  engine:    {completion.token_ids}\n  reference: {list(expected.token_ids)}")
            assert completion.finish_reason == expected.finish_reason, (
                f"finish reason {completion.finish_reason!r}, reference {expected.finish_reason!r}")
            return
        tokens = completion.token_ids
        enders = set(greedy_params.get("stop_token_ids", ())) | (
            set() if greedy_params.get("ignore_eos") else self.reference.eos_token_ids)
        if completion.finish_reason == "length":
            assert len(tokens) == max_new_tokens, (
                f"finish reason 'length' after {len(tokens)} of {max_new_tokens} tokens")
        else:
            assert completion.finish_reason == "stop" and tokens and tokens[-1] in enders, (
                f"finish reason {completion.finish_reason!r} with last token {tokens[-1:]} "
                f"(stop tokens {sorted(enders)})")
        assert not set(tokens[:-1]) & enders, "the output continued past a stop token"
        self.assert_greedy_choices(prompt, completion, weights=weights, lora=lora, **greedy_params)

    def assert_greedy_choices(self, prompt: Sequence[int], completion: Completion, *, weights: str = "original",
                              lora: str | None = None, **greedy_params: Any) -> None:
        """Every token of the completion is the reference's greedy choice given the tokens before it,
        from one teacher-forced reference pass (no reference decode, so it stays cheap for responses
        of hundreds of tokens): exactly for a float32 engine (margin 0), within the dtype's greedy
        margin otherwise. Length and finish reason are the caller's to check."""
        margins = self.reference.greedy_margins(prompt, completion.token_ids, weights=weights, lora=lora,
                                                **greedy_params)
        worst = max(margins, default=0.0)
        assert worst <= self.greedy_margin, (
            f"greedy token at position {margins.index(worst)} is {worst:.4f} nats below the reference "
            f"argmax (allowed for {self.engine_dtype}: {self.greedy_margin}); tokens {completion.token_ids}")


def capabilities_of(config: ConformanceConfig) -> Capabilities:
    """What the backend declares for this configuration, asked without starting an engine."""
    backend = get_backend(config.backend)
    generator_config = load_config(None, backend=config.backend, model=config.model, **config.engine_options)
    caps = backend.manager.hook.skyrl_backends_capabilities(config=generator_config)
    if not isinstance(caps, Capabilities):
        raise TypeError(f"backend {config.backend!r}: skyrl_backends_capabilities returned "
                        f"{type(caps).__name__}, not Capabilities")
    return caps


def new_event_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()
