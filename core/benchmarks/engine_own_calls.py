"""The engines' own calls, made on the engine object a skyrl backend built: the baselines of the
benchmarks that compare a step through skyrl with the same step written by hand against the engine
(``bench_wake_cycle.py``: the colocated memory cycle; ``examples/rl_demo/benchmarks/bench_step.py``:
the RL step). Not an API: a hand-written loop of the kind a trainer writes for one engine.

``own_calls("vllm", engine.impl)`` / ``own_calls("sglang", engine.impl)`` returns an object with

    sleep(level)                   vLLM: ``AsyncLLM.sleep``; SGLang: the tokenizer manager's
                                   ``release_memory_occupation`` (every tag)
    wake_up(tags)                  ``AsyncLLM.wake_up(tags=...)``; ``resume_memory_occupation(tags)``
    sync(named_tensors, flush_cache)
                                   vLLM: one tensor handle each (CUDA IPC on a GPU, shared memory on a
                                   CPU) through ``collective_rpc`` into the model's ``load_weights`` (what
                                   an RL worker extension does; the plugin's ``skyrl_apply_weights`` is
                                   that load), then ``reset_prefix_cache``; SGLang:
                                   ``update_weights_from_tensor(flush_cache=...)``, inside
                                   ``begin_weight_update`` / ``end_weight_update`` where the release
                                   has them. Without the flush,
                                   prompts whose prefix is cached continue from the old weights' KV: a
                                   loop may skip it only where its sleep already emptied the cache.
    generate(prompts, ...)         vLLM: one ``AsyncLLM.generate`` per prompt, final output only, no
                                   detokenization; SGLang: one batched ``sglang.Engine.async_generate``.
                                   Returns ``OwnOutput`` per prompt.

SGLang's calls run on the engine's own event loop (``impl._on_loop``): sglang.Engine's blocking
methods are these tokenizer-manager coroutines wrapped in a run of that loop, which cannot nest in a
running loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class OwnOutput:
    """One prompt's completion as the engine returned it: tokens, each token's log-probability
    (when asked for) and why it ended (``"stop"``, ``"length"``, or the engine's word otherwise)."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str


class OwnCalls(Protocol):
    async def sleep(self, level: int) -> None: ...

    async def wake_up(self, tags: Sequence[str]) -> None: ...

    async def sync(self, named_tensors: Sequence[tuple[str, torch.Tensor]], flush_cache: bool = True) -> None: ...

    async def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float,
                       logprobs: bool = False, stop_token_ids: Sequence[int] = ()) -> list[OwnOutput]: ...


class VLLMOwnCalls:
    """vLLM's own calls on the plugin's ``AsyncLLM`` (``impl._engine``)."""

    def __init__(self, impl: Any) -> None:
        self.llm = impl._engine
        self._request_ids = (f"own-{i}" for i in itertools.count())

    async def sleep(self, level: int) -> None:
        await self.llm.sleep(level=level)

    async def wake_up(self, tags: Sequence[str]) -> None:
        await self.llm.wake_up(tags=list(tags))

    async def sync(self, named_tensors: Sequence[tuple[str, torch.Tensor]], flush_cache: bool = True) -> None:
        from skyrl_backend_vllm import transfer

        names = [name for name, _ in named_tensors]
        with transfer.pack_tensors(names, [t.detach() for _, t in named_tensors]) as message:
            await self.llm.collective_rpc("skyrl_apply_weights", args=(message.message,))
        if flush_cache:
            await self.llm.reset_prefix_cache()

    async def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float,
                       logprobs: bool = False, stop_token_ids: Sequence[int] = ()) -> list[OwnOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, logprobs=0 if logprobs else None,
                                stop_token_ids=list(stop_token_ids), detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(prompt: Sequence[int]) -> OwnOutput:
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt)), params,
                                               next(self._request_ids)):
                final = out
            assert final is not None
            sample = final.outputs[0]
            tokens = list(sample.token_ids)
            values = [sample.logprobs[i][t].logprob for i, t in enumerate(tokens)] if logprobs else None
            return OwnOutput(tokens, values, str(sample.finish_reason))

        return list(await asyncio.gather(*(one(p) for p in prompts)))


class SGLangOwnCalls:
    """SGLang's own calls on the plugin's ``sglang.Engine`` (``impl.engine``) and its tokenizer
    manager (``impl.tm``), on the engine's loop (module docstring)."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl
        self.tm = impl.tm

    async def _on_loop(self, make: Callable[[], Awaitable[Any]]) -> Any:
        return await self.impl._on_loop(make())

    async def sleep(self, level: int) -> None:
        from sglang.srt.managers import io_struct

        await self._on_loop(lambda: self.tm.release_memory_occupation(io_struct.ReleaseMemoryOccupationReqInput(),
                                                                      None))

    async def wake_up(self, tags: Sequence[str]) -> None:
        from sglang.srt.managers import io_struct

        await self._on_loop(lambda: self.tm.resume_memory_occupation(
            io_struct.ResumeMemoryOccupationReqInput(tags=list(tags)), None))

    async def sync(self, named_tensors: Sequence[tuple[str, torch.Tensor]], flush_cache: bool = True) -> None:
        from sglang.srt.managers import io_struct
        from sglang.srt.utils import MultiprocessingSerializer

        named = [(name, t.detach()) for name, t in named_tensors]
        obj = io_struct.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=[MultiprocessingSerializer.serialize(named) for _ in range(self.impl.tp_size)],
            load_format=None, flush_cache=flush_cache)
        success, message = await self._on_loop(lambda: self._in_update_session(
            lambda: self.tm.update_weights_from_tensor(obj, None)))
        assert success, message

    async def _in_update_session(self, update: Callable[[], Awaitable[Any]]) -> Any:
        """SGLang releases with ``begin_weight_update`` (0.5.23 has it, 0.5.17 not) refuse an update
        outside one: begin, update, end, as any caller of that release must."""
        if not hasattr(self.tm, "begin_weight_update"):
            return await update()
        from sglang.srt.managers import io_struct

        began, message = await self.tm.begin_weight_update(io_struct.BeginWeightUpdateReqInput(), None)
        assert began, message
        try:
            return await update()
        finally:
            await self.tm.end_weight_update(io_struct.EndWeightUpdateReqInput(), None)

    async def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float,
                       logprobs: bool = False, stop_token_ids: Sequence[int] = ()) -> list[OwnOutput]:
        sampling = {"max_new_tokens": max_tokens, "temperature": temperature}
        if stop_token_ids:
            sampling["stop_token_ids"] = list(stop_token_ids)
        outs = await self._on_loop(lambda: self.impl.engine.async_generate(
            input_ids=[list(p) for p in prompts], sampling_params=sampling, return_logprob=logprobs))
        results = []
        for out in outs:
            meta = out.get("meta_info", {})
            tokens = list(out["output_ids"])
            values = [entry[0] for entry in meta["output_token_logprobs"][:len(tokens)]] if logprobs else None
            reason = meta.get("finish_reason") or {}
            results.append(OwnOutput(tokens, values, str(reason.get("type") if isinstance(reason, dict) else reason)))
        return results


def own_calls(engine: str, impl: Any) -> OwnCalls:
    """The own calls of ``engine`` (``"vllm"`` or ``"sglang"``) on a skyrl engine's ``impl``."""
    if engine == "vllm":
        return VLLMOwnCalls(impl)
    if engine == "sglang":
        return SGLangOwnCalls(impl)
    raise ValueError(f"no own calls for engine {engine!r}: vllm or sglang")
