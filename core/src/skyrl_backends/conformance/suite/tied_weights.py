"""Tied embeddings: a model whose output layer is its input embedding (``tie_word_embeddings``:
Qwen2.5 up to 3B, Llama 3.2 1B and 3B) holds that tensor once, and a trainer sending
``named_parameters()`` sends it once, under the embedding's name. An engine must take that as the
whole model: both ends of it change, and after a sleep that discarded its weights it generates again.

The group runs on the suite's own tiny model with tied embeddings, in an engine of its own (the
configured backend and options); the shared engine of the other groups is stopped first, so one
engine lives at a time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from skyrl_backends import capabilities
from skyrl_backends.checkpoint import TIED_EMBEDDING, TIED_HEAD
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
from skyrl_backends.conformance.suite.base import FAILED_KEY, ConformanceTestBase


def tied_model_dir() -> str:
    """The suite's tiny model with tied embeddings, built once per machine (offline, deterministic)."""
    from skyrl_backends.testing.cache import cache_dir
    from skyrl_backends.testing.tiny_model import build_tiny_model

    return str(build_tiny_model(cache_dir("tiny-model-tied"), with_lora=False, tied=True))


def parameters(harness: ConformanceHarness, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What a trainer sends: one tensor per parameter of the reference module (``named_parameters``
    names the tied tensor once, as the embedding), from ``state`` or the original weights."""
    names = [name for name, _ in harness.reference.module.named_parameters()]
    source = state if state is not None else harness.reference.original_state
    return {name: source[name] for name in names}


def send_parameters(harness: ConformanceHarness, params: dict[str, torch.Tensor] | None = None) -> int:
    """Push ``params`` (default: the original parameters) by their own names, as a trainer does;
    returns the engine's new weight version."""
    params = params if params is not None else parameters(harness)
    return harness.push_weights(params, names=list(params))


def perturbed_parameters(harness: ConformanceHarness, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The parameters with seeded noise, the tied tensor perturbed once, and the name they are
    registered under with the reference (the head equal to the embedding, as in the tied model)."""
    reference = harness.reference
    noisy = parameters(harness, reference.perturbed_state(seed=seed))
    name = f"tied-perturbed-{seed}"
    reference.add_weights(name, {**noisy, TIED_HEAD: noisy[TIED_EMBEDDING]})
    return noisy, name


class TiedWeightsTests(ConformanceTestBase):
    feature_row = "Weight sync, tied embeddings"

    @pytest.fixture(scope="class")
    @classmethod
    def tied_harness(cls, conformance: ConformanceHarness) -> Iterator[ConformanceHarness]:
        """A harness on the tied model (its engine started on first use, stopped after the group)."""
        harness = conformance.for_model(tied_model_dir())
        conformance.discard_shared()
        yield harness
        harness.close()

    @pytest.fixture
    def tied(self, request: pytest.FixtureRequest, tied_harness: ConformanceHarness) -> Iterator[ConformanceHarness]:
        """The tied harness; its engine is replaced after a failed test, which may have left it with
        other weights (the guard of the other groups does this for the shared engine)."""
        yield tied_harness
        if request.node.stash.get(FAILED_KEY, False) or not tied_harness.shared_engine_is_clean():
            tied_harness.discard_shared()

    def test_the_model_is_tied(self, tied: ConformanceHarness) -> None:
        module = tied.reference.module
        assert module.config.tie_word_embeddings
        assert module.get_output_embeddings().weight is module.get_input_embeddings().weight
        assert TIED_HEAD not in parameters(tied), "named_parameters() names a tied tensor once"

    def test_specs_name_the_head_as_the_embedding(self, tied: ConformanceHarness) -> None:
        specs = tied.weight_specs()
        assert TIED_EMBEDDING in specs, (
            f"the engine lists no {TIED_EMBEDDING} among its parameters: {sorted(specs)[:8]}")
        if TIED_HEAD in specs:
            assert specs[TIED_HEAD].tied_to == TIED_EMBEDDING, (
                f"{TIED_HEAD} is listed as a tensor of its own (tied_to={specs[TIED_HEAD].tied_to!r}); in a tied "
                f"model it is {TIED_EMBEDDING}, and a trainer sending named_parameters() never sends it by that name")

    @requires(capabilities.weight_sync("tensors"))
    def test_parameters_sent_once_change_both_ends(self, tied: ConformanceHarness) -> None:
        prompts = tied.reference.prompts(3, seed=71)
        original = tied.greedy(prompts, 12, logprobs=0)
        version = tied.engine.weight_version
        noisy, weights = perturbed_parameters(tied, seed=5)
        assert send_parameters(tied, noisy) == version + 1
        changed = tied.greedy(prompts, 12)
        assert changed.response_ids != original.response_ids, "sending different weights did not change output"
        # The reference's head is the perturbed embedding: an engine that changed only its
        # embedding (a head of its own, left as it was) decodes otherwise.
        for prompt, completion in zip(prompts, changed, strict=True):
            tied.assert_greedy_parity(prompt, completion, 12, weights=weights)
        send_parameters(tied)
        restored = tied.greedy(prompts, 12, logprobs=0)
        assert restored.response_ids == original.response_ids, "sending the original weights must restore output"

    @requires(capabilities.weight_sync("tensors"))
    def test_both_names_sent_are_taken(self, tied: ConformanceHarness) -> None:
        """A state dict names the tied tensor twice (embedding and head, equal): also a whole update."""
        specs = tied.weight_specs()
        prompts = tied.reference.prompts(2, seed=72)
        noisy, weights = perturbed_parameters(tied, seed=6)
        both = {**noisy, TIED_HEAD: noisy[TIED_EMBEDDING]}
        names = list(noisy) + ([TIED_HEAD] if TIED_HEAD in specs else [])
        tied.push_weights(both, names=names)
        for prompt, completion in zip(prompts, tied.greedy(prompts, 12), strict=True):
            tied.assert_greedy_parity(prompt, completion, 12, weights=weights)
        send_parameters(tied)

    @requires(capabilities.DISCARDS_WEIGHTS, capabilities.weight_sync("tensors"))
    def test_after_discarding_sleep_parameters_sent_once_are_enough(self, tied: ConformanceHarness) -> None:
        """The case that locked a tied model's engine out for good: after a sleep that discarded the
        weights, an engine waiting for the head by its own name refused to generate forever."""
        engine = tied.engine
        prompts = tied.reference.prompts(2, seed=73)
        level = tied.capabilities.discards_weights_at_level
        assert level is not None
        tied.run(engine.sleep(level=level))
        tied.run(engine.wake_up())
        send_parameters(tied)
        assert engine.weights_loaded, "every parameter was sent, the tied one once, yet the engine waits for more"
        for prompt, completion in zip(prompts, tied.greedy(prompts, 12), strict=True):
            tied.assert_greedy_parity(prompt, completion, 12)
