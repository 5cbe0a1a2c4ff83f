"""A weight update that lands while a long generation runs (issue 17's reproduction).

A trainer starts a long generation, pauses, pushes new weights and resumes. The tokens before the
seam come from the old weights and those after it from the new ones, so the completion must say so
token by token, in every way of pausing: natively (the engine keeps the request and its cache), with
recomputation of the kept cache, and by abort-and-continue through the client. Where the seam lies
is found here without trusting the engine: it is the first token whose log-probability leaves the
old weights' teacher-forced forward pass.
"""

from __future__ import annotations

import asyncio

import pytest
import skyrl_backends as sb
import torch
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.conformance.oracles import ReferenceModel

LENGTH = 48
PARAMS = {"max_generate_length": LENGTH, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
PROMPT = [11, 42, 7, 19, 3]
WATCHED = [5, 6, 7, 8]
TOLERANCE = 1e-4  # float32 engine and reference; only summation orders differ


@pytest.fixture(scope="module")
def reference(model_dir):
    ref = ReferenceModel(model_dir)
    ref.add_weights("new", ref.perturbed_state(seed=3))
    return ref


def _chosen(logprobs: torch.Tensor, tokens: list[int]) -> list[float]:
    return logprobs.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1).tolist()


def empirical_seam(reference: ReferenceModel, completion) -> int:
    """The first token the old weights' forward pass does not explain."""
    old = _chosen(reference.teacher_forced_logprobs(PROMPT, completion.token_ids), completion.token_ids)
    for k, (engine_lp, old_lp) in enumerate(zip(completion.logprobs, old)):
        if abs(engine_lp - old_lp) > 1e-3:
            return k
    return len(old)


def per_token_versions(completion) -> list[int]:
    versions = getattr(completion, "token_versions", None)
    return versions.per_token() if versions is not None else [completion.weight_version] * len(completion.token_ids)


async def _after_some_tokens(engine, count: int = 8) -> None:
    """Let a second request stream ``count`` tokens; the engine decodes both requests in lockstep,
    so the one under test is as far along."""
    stream = engine.generate_stream([WATCHED], PARAMS)
    seen = 0
    async for chunk in stream:
        seen += len(chunk.token_ids)
        if seen >= count:
            break
    await stream.aclose()


def _run_paused_update(model_dir, reference, pause, through_client: bool = False):
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        target = InferenceEngineClient([engine], keep_strategy="continue") if through_client else engine
        try:
            task = asyncio.ensure_future(target.generate([PROMPT], PARAMS))
            await _after_some_tokens(engine)
            await pause(target)
            version = await target.update_weights_from_tensors(list(reference._weights["new"].items()))
            await target.resume_generation()
            return (await task)[0], version
        finally:
            await target.teardown()

    return asyncio.run(scenario())


def _check_before_the_seam(reference, completion, seam: int) -> None:
    assert 0 < seam < LENGTH, f"the update should land mid-way (seam at token {seam} of {LENGTH})"
    assert len(completion.token_ids) == LENGTH and completion.finish_reason == "length"
    assert per_token_versions(completion) == [0] * seam + [1] * (LENGTH - seam), (
        f"tokens 0..{seam - 1} come from version 0 and the rest from version 1; the completion says "
        f"{per_token_versions(completion)}")
    assert completion.token_versions.runs == ((0, 0), (seam, 1))
    assert (completion.oldest_version, completion.newest_version) == (0, 1)


def test_native_pause_keeps_the_request_and_stamps_each_token(model_dir, reference):
    completion, version = _run_paused_update(model_dir, reference, lambda e: e.pause_generation("keep"))
    assert version == 1
    seam = empirical_seam(reference, completion)
    _check_before_the_seam(reference, completion, seam)
    # After the seam: the new weights on top of the cache the old weights computed.
    kept = _chosen(reference.kept_cache_logprobs(PROMPT, completion.token_ids, seam, after="new"),
                   completion.token_ids[seam:])
    assert max(abs(a - b) for a, b in zip(completion.logprobs[seam:], kept)) < TOLERANCE


def test_recompute_on_resume_gives_the_new_weights_own_log_probabilities(model_dir, reference):
    completion, _ = _run_paused_update(model_dir, reference, lambda e: e.pause_generation("keep", recompute=True))
    seam = empirical_seam(reference, completion)
    _check_before_the_seam(reference, completion, seam)
    new = _chosen(reference.teacher_forced_logprobs(PROMPT, completion.token_ids, weights="new"),
                  completion.token_ids)
    assert max(abs(a - b) for a, b in zip(completion.logprobs[seam:], new[seam:])) < TOLERANCE


def test_abort_and_continue_through_the_client_stamps_each_token(model_dir, reference):
    completion, _ = _run_paused_update(model_dir, reference, lambda c: c.pause_generation("keep"),
                                       through_client=True)
    seam = empirical_seam(reference, completion)
    _check_before_the_seam(reference, completion, seam)
    # The continuation is a fresh prefill under the new weights: their own forward pass.
    new = _chosen(reference.teacher_forced_logprobs(PROMPT, completion.token_ids, weights="new"),
                  completion.token_ids)
    assert max(abs(a - b) for a, b in zip(completion.logprobs[seam:], new[seam:])) < TOLERANCE
