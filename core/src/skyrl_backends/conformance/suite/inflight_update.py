"""In-flight weight update: a weight update that lands while requests run, in every pause mode.

Each test runs greedy requests of a fixed length, lets them produce tokens, pauses (or not), pushes
the perturbed weights, resumes, and checks every token against an oracle that never goes through
the backend:

* the completion has exactly the requested number of tokens, and its per-token versions are the
  old version up to the seam and the new one after it (``token_versions.runs``);
* tokens before the seam are the old weights' greedy choices, with the old weights' teacher-forced
  log-probabilities;
* tokens after the seam have the log-probabilities the mode defines: in ``keep`` the new weights
  on top of the cache the old weights computed (``ReferenceModel.kept_cache_logprobs``); with
  ``recompute`` or a continuation, the new weights' own teacher-forced forward pass;
* a stream's chunks add up to its completion, versions included.

Together the two oracles pin the seam from both sides: a token of the new weights labelled old
fails the first, a token of the old weights labelled new fails the second. The original weights
are pushed back at the end of every test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from skyrl_backends import capabilities
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.logprobs import LogprobCheck
from skyrl_backends.conformance.suite.races import ran_to_the_end, retry_lost_race, until_inflight
from skyrl_backends.conformance.suite.weight_sync import PERTURBED, perturbed
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, StreamChunk, TokenVersions

LENGTH = 64
SEEN_BEFORE_PAUSE = 6  # tokens a streamed request has produced before the test pauses


def _kept_length(conformance: ConformanceHarness) -> int:
    """How long the requests a pause must catch mid-way run. An engine's own server starts each
    request after its own HTTP round trip, so the plain request may be tens of steps ahead of the
    streamed one the test watches: its requests run four times longer, to be still running."""
    return LENGTH * 4 if conformance.config.server else LENGTH


def _params(length: int = LENGTH) -> SamplingParams:
    return SamplingParams(max_generate_length=length, temperature=0.0, ignore_eos=True, logprobs=0)


class _StreamedRequest:
    """A streamed request running in the background, its chunks kept."""

    def __init__(self, target: Any, prompt: list[int], params: SamplingParams) -> None:
        self.chunks: list[StreamChunk] = []
        self.progress = asyncio.Event()
        self.task = asyncio.ensure_future(self._read(target, prompt, params))

    async def _read(self, target: Any, prompt: list[int], params: SamplingParams) -> Completion:
        async for chunk in target.generate_stream([prompt], params):
            self.chunks.append(chunk)
            if self.tokens_seen >= SEEN_BEFORE_PAUSE:
                self.progress.set()
        self.progress.set()
        final = self.chunks[-1].completion
        assert final is not None, "the stream ended without its completion"
        return final

    @property
    def tokens_seen(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    async def started(self) -> None:
        await asyncio.wait_for(self.progress.wait(), 300)  # a bound on a hang, not a speed check

    def check_chunks(self) -> None:
        """The chunks add up to the completion: tokens and versions."""
        final = self.chunks[-1].completion
        assert final is not None and all(c.completion is None for c in self.chunks[:-1])
        assert [t for c in self.chunks for t in c.token_ids] == final.token_ids
        versions = TokenVersions((), 0)
        for chunk in self.chunks:
            assert chunk.token_versions is not None and chunk.token_versions.length == len(chunk.token_ids), (
                f"a stream chunk's versions must cover its {len(chunk.token_ids)} tokens: {chunk.token_versions}")
            versions = versions.concat(chunk.token_versions)
        assert versions.per_token() == final.token_versions.per_token(), (
            f"the chunks' versions {versions.to_json()} differ from the completion's "
            f"{final.token_versions.to_json()}")


async def _until_running(engine: Any, streamed: _StreamedRequest | None) -> None:
    """Until the requests under test have produced tokens: a stream says so; without one, wait for
    the engine to hold the requests and give it a moment."""
    if streamed is not None and engine.capabilities.streaming:
        await streamed.started()
        return
    await until_inflight(engine)
    await asyncio.sleep(0.05)


class InflightUpdateTests(ConformanceTestBase):
    feature_row = "In-flight weight update"

    # -- helpers ---------------------------------------------------------------------------------
    def _scenario(self, conformance: ConformanceHarness, pause: Callable[[Any], Awaitable[None]] | None,
                  target_of: Callable[[Any], Any] | None = None, length: int = LENGTH,
                  waiting_prompt: list[int] | None = None) -> tuple[list[Completion], _StreamedRequest, int, int,
                                                                   Completion | None]:
        """Run a streamed and a plain request, pause with ``pause`` (None: no pause), push the
        perturbed weights, resume. Returns the completions (plain, streamed), the stream, the old
        and new versions, and the completion of ``waiting_prompt``, submitted while paused."""
        engine = conformance.engine
        state = perturbed(conformance)
        update = conformance.weight_update(state)
        prompts = conformance.reference.prompts(2, seed=171)
        params = _params(length)

        async def scenario() -> tuple[list[Completion], _StreamedRequest, int, int, Completion | None]:
            target = target_of(engine) if target_of is not None else engine
            old = engine.weight_version
            plain = asyncio.ensure_future(target.generate([prompts[0]], params))
            streamed = _StreamedRequest(target, prompts[1], params)
            await _until_running(engine, streamed)
            waiting = None
            if pause is not None:
                await pause(target)
                if waiting_prompt is not None:
                    waiting = asyncio.ensure_future(target.generate([waiting_prompt], _params(16)))
                    await asyncio.sleep(0.05)
                    assert not waiting.done(), "a request sent while paused must wait for resume"
            await target.update_named_weights(update)
            new = engine.weight_version
            if pause is not None:
                await target.resume_generation()
            outs = [(await plain)[0], await streamed.task]
            return outs, streamed, old, new, (await waiting)[0] if waiting is not None else None

        try:
            outs, streamed, old, new, waiting = conformance.run(scenario())
        finally:
            conformance.push_weights(conformance.reference.original_state)
        return outs, streamed, old, new, waiting

    @staticmethod
    def _seam(completion: Completion, old: int, new: int) -> int:
        """Where the completion says the new weights took over, after checking its versions name
        only those two, old first."""
        versions = completion.token_versions
        assert versions is not None and versions.length == len(completion.token_ids)
        allowed = {((0, old),), ((0, new),)} | {((0, old), (k, new)) for k in range(1, versions.length)}
        assert versions.runs in allowed, (
            f"per-token versions {versions.to_json()}: expected version {old} up to a seam and {new} after it")
        return versions.runs[1][0] if len(versions.runs) == 2 else (0 if versions.runs[0][1] == new
                                                                     else versions.length)

    def _check(self, conformance: ConformanceHarness, prompt: list[int], completion: Completion, seam: int,
               after: str) -> None:
        """Tokens before the seam are the old weights'; after it, ``after`` says whose: ``"kept"``
        (new weights over the old cache) or ``"fresh"`` (the new weights' own forward pass)."""
        tokens, logprobs = completion.token_ids, completion.logprobs
        assert logprobs is not None and len(logprobs) == len(tokens)
        reference = conformance.reference
        old = reference.teacher_forced_logprobs(prompt, tokens)
        self._compare(conformance, tokens[:seam], logprobs[:seam], old[:seam], "before the seam, the old weights'")
        if seam == len(tokens):
            return
        if after == "kept" and seam > 0:
            expected = reference.kept_cache_logprobs(prompt, tokens, seam, after=PERTURBED)
            what = "after the seam, the new weights over the kept cache"
        else:
            expected = reference.teacher_forced_logprobs(prompt, tokens, weights=PERTURBED)[seam:]
            what = "after the seam, the new weights' own"
        self._compare(conformance, tokens[seam:], logprobs[seam:], expected, what)

    @staticmethod
    def _compare(conformance: ConformanceHarness, tokens: list[int], logprobs: list[float],
                 expected: torch.Tensor, what: str) -> None:
        if not tokens:
            return
        chosen = expected.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
        # The suite's one rule for log-probabilities (exact in float32; in half precision a few
        # rounding outliers, a bounded worst and a small mean): GPU kernels in bfloat16 put single
        # tokens 0.3-0.4 nats off the trainer's forward pass (docs/consistency.md, max |delta|).
        check = LogprobCheck(conformance)
        for i, (got, want) in enumerate(zip(logprobs, chosen.tolist(), strict=True)):
            check.add(got, want, f"{what}, token {tokens[i]} at {i} of {len(tokens)}")
        check.verify()
        below_argmax = (expected.max(dim=-1).values - chosen).max().item()
        assert below_argmax <= conformance.greedy_margin + conformance.logprob_tolerance, (
            f"greedy tokens {what}: a token is {below_argmax:.3g} nats below the oracle's argmax")

    # -- keep ------------------------------------------------------------------------------------
    @requires(capabilities.NATIVE_PAUSE, capabilities.TOKEN_VERSIONS)
    def test_keep_stamps_each_token_and_continues_on_the_kept_cache(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)
        waiting_prompt = conformance.reference.prompts(1, seed=172)[0]
        length = _kept_length(conformance)
        (plain, streamed_out), streamed, old, new, waiting = self._scenario(
            conformance, lambda e: e.pause_generation("keep"), waiting_prompt=waiting_prompt, length=length)
        assert new == old + 1
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert len(completion.token_ids) == length and completion.finish_reason == "length", (
                "a kept request ends with exactly its requested length")
            seam = self._seam(completion, old, new)
            assert 0 < seam < length, f"the update should land mid-way (seam {seam} of {length})"
            self._check(conformance, prompt, completion, seam, "kept")
        assert self._seam(streamed_out, old, new) >= SEEN_BEFORE_PAUSE or not conformance.capabilities.streaming
        assert waiting is not None and waiting.token_versions.runs == ((0, new),)
        conformance.assert_greedy_parity(waiting_prompt, waiting, 16, weights=PERTURBED, ignore_eos=True)

    @requires(capabilities.RECOMPUTE_ON_RESUME, capabilities.TOKEN_VERSIONS)
    def test_keep_with_recompute_continues_as_the_new_weights_would(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)
        length = _kept_length(conformance)
        (plain, streamed_out), streamed, old, new, _ = self._scenario(
            conformance, lambda e: e.pause_generation("keep", recompute=True), length=length)
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert len(completion.token_ids) == length and completion.finish_reason == "length"
            seam = self._seam(completion, old, new)
            assert 0 < seam < length, f"the update should land mid-way (seam {seam} of {length})"
            self._check(conformance, prompt, completion, seam, "fresh")

    @requires(capabilities.TOKEN_VERSIONS)
    def test_update_without_a_pause_is_stamped_like_keep(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)
        (plain, streamed_out), streamed, old, new, _ = self._scenario(conformance, None, length=160)
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert len(completion.token_ids) == 160 and completion.finish_reason == "length"
            seam = self._seam(completion, old, new)
            self._check(conformance, prompt, completion, seam, "kept")

    # -- abort and wait --------------------------------------------------------------------------
    @requires(capabilities.ABORT)
    def test_abort_ends_requests_with_the_old_weights_tokens(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)
        waiting_prompt = conformance.reference.prompts(1, seed=173)[0]
        length = conformance.long_generation
        # The plain request's start is not observable: one that reached the engine only after the
        # pause waits for the resume and then runs to its full length. That is a lost race, retried.
        (plain, streamed_out), streamed, old, new, waiting = retry_lost_race(
            lambda _: self._scenario(conformance, lambda e: e.pause_generation("abort"), length=length,
                                     waiting_prompt=waiting_prompt),
            lambda result: any(ran_to_the_end(c, _params(length)) for c in result[0]), "abort in flight")
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert completion.finish_reason == "abort" and len(completion.token_ids) < conformance.long_generation
            assert completion.token_versions == TokenVersions.uniform(len(completion.token_ids), old), (
                f"an aborted request ran on version {old} only: {completion.token_versions.to_json()}")
            self._check(conformance, prompt, completion, len(completion.token_ids), "fresh")
        assert waiting is not None and waiting.token_versions.runs == ((0, new),)
        conformance.assert_greedy_parity(waiting_prompt, waiting, 16, weights=PERTURBED, ignore_eos=True)

    def test_wait_lets_requests_finish_on_the_old_weights(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)
        waiting_prompt = conformance.reference.prompts(1, seed=174)[0]
        (plain, streamed_out), streamed, old, new, waiting = self._scenario(
            conformance, lambda e: e.pause_generation("wait"), waiting_prompt=waiting_prompt)
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert completion.finish_reason == "length" and len(completion.token_ids) == LENGTH
            assert completion.token_versions == TokenVersions.uniform(LENGTH, old)
            conformance.assert_greedy_parity(prompt, completion, LENGTH, ignore_eos=True)
        assert waiting is not None and waiting.token_versions.runs == ((0, new),)
        conformance.assert_greedy_parity(waiting_prompt, waiting, 16, weights=PERTURBED, ignore_eos=True)

    # -- abort-and-continue through the client ---------------------------------------------------
    @requires(capabilities.ABORT)
    def test_continuation_through_the_client_is_the_new_weights_own(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=171)

        def client_of(engine: Any) -> InferenceEngineClient:
            return InferenceEngineClient([engine], keep_strategy="continue")

        (plain, streamed_out), streamed, old, new, _ = self._scenario(
            conformance, lambda c: c.pause_generation("keep"), target_of=client_of)
        streamed.check_chunks()
        for prompt, completion in zip(prompts, (plain, streamed_out), strict=True):
            assert len(completion.token_ids) == LENGTH and completion.finish_reason == "length", (
                "a continued request ends with exactly its requested length")
            seam = self._seam(completion, old, new)
            self._check(conformance, prompt, completion, seam, "fresh")
