"""Weight sync: updates change output, restoring the original weights restores greedy output
exactly, and a bad update is rejected whole and changes nothing."""

from __future__ import annotations

import pytest
import torch

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest

PERTURBED = "perturbed"


def perturbed(conformance: ConformanceHarness) -> dict[str, torch.Tensor]:
    state = conformance.reference.perturbed_state(seed=3)
    conformance.reference.add_weights(PERTURBED, state)
    return state


class WeightSyncTests(ConformanceTestBase):
    feature_row = "Weight sync (in-process tensors)"

    @requires(capabilities.weight_sync("tensors"))
    def test_update_changes_output_and_restore_is_exact(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompts = conformance.reference.prompts(3, seed=61)
        if capabilities.PREFIX_CACHING(engine.capabilities):
            # The restored run below finds the cache the update emptied; the original one must too.
            # From the cache earlier tests left, SGLang's CPU path gave the same weights log-probabilities
            # differing in their last bits (an Intel Xeon host, 2026-12-05): the two runs must start alike.
            conformance.run(engine.reset_prefix_cache())
        original = conformance.greedy(prompts, 16, logprobs=0)
        version = engine.weight_version
        new_version = conformance.push_weights(perturbed(conformance))
        assert new_version == version + 1 == engine.weight_version
        changed = conformance.greedy(prompts, 16)
        assert changed.response_ids != original.response_ids, "pushing different weights did not change output"
        for prompt, c in zip(prompts, changed, strict=True):
            conformance.assert_greedy_parity(prompt, c, 16, weights=PERTURBED)
            assert c.weight_version == new_version
        conformance.push_weights(conformance.reference.original_state)
        restored = conformance.greedy(prompts, 16, logprobs=0)
        assert restored.response_ids == original.response_ids, "restoring the original weights must restore output"
        assert restored.logprobs == original.logprobs, "restoring the original weights must restore logprobs exactly"

    @requires(capabilities.weight_sync("tensors"))
    def test_partial_update(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=62)[0]
        original = conformance.greedy([prompt], 12)[0].token_ids
        state = perturbed(conformance)
        specs = conformance.weight_specs(engine)
        names = [n for n in specs if "lm_head" in n or "embed" in n] or list(specs)[:1]
        conformance.push_weights(state, names=names)
        partial = {**conformance.reference.original_state, **{n: state[n] for n in names}}
        conformance.reference.add_weights("partial", partial)
        c = conformance.greedy([prompt], 12)[0]
        conformance.assert_greedy_parity(prompt, c, 12, weights="partial")
        conformance.push_weights(conformance.reference.original_state, names=names)
        assert conformance.greedy([prompt], 12)[0].token_ids == original

    @feature("Weight update validation")
    @pytest.mark.parametrize("fault", ["name", "shape", "dtype", "one_bad_among_good"])
    def test_bad_update_is_rejected_and_changes_nothing(self, conformance: ConformanceHarness, fault: str) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=63)[0]
        before = conformance.greedy([prompt], 12, logprobs=0)[0]
        version = engine.weight_version
        good = conformance.weight_update(perturbed(conformance))
        name = good.names[0]
        tensor = good.payload[0]
        if fault == "name":
            bad = [(name + "_typo", tensor)]
        elif fault == "shape":
            bad = [(name, torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:], dtype=tensor.dtype))]
        elif fault == "dtype":
            other = torch.float16 if tensor.dtype != torch.float16 else torch.float32
            bad = [(name, tensor.to(other))]
        else:  # every tensor valid and perturbed except the last: nothing at all may be applied
            pairs = list(zip(good.names, good.payload, strict=True))
            bad = pairs[:-1] + [(pairs[-1][0], torch.zeros(3, dtype=pairs[-1][1].dtype))]
        with pytest.raises(WeightUpdateError) as error:
            conformance.run(engine.update_named_weights(WeightUpdateRequest.from_named_tensors(bad)))
        offending = bad[0][0] if fault != "one_bad_among_good" else bad[-1][0]
        assert offending in str(error.value), f"the error must name the offending tensor {offending!r}"
        assert engine.weight_version == version
        after = conformance.greedy([prompt], 12, logprobs=0)[0]
        assert after.token_ids == before.token_ids, "a rejected weight update changed the model's output"
        # Not bit-exact: the second run may be served from a prefix cache; any applied tensor of
        # the perturbed set moves log-probabilities far more than the tolerance.
        drift = max(abs(a - b) for a, b in zip(after.logprobs or [], before.logprobs or [], strict=True))
        assert drift <= conformance.logprob_tolerance, (
            f"a rejected weight update changed the model (log-probabilities moved by {drift:.2e})")

    @feature("Weight update validation")
    def test_weight_specs_use_reference_names(self, conformance: ConformanceHarness) -> None:
        specs = conformance.weight_specs()
        reference = conformance.reference.original_state
        assert specs, "weight_specs is empty: no weight update could ever target this engine"
        unknown = [n for n in specs if n not in reference]
        assert not unknown, f"weight_specs names {unknown[:5]} are not the model's Hugging Face parameter names"
        for name, spec in specs.items():
            assert tuple(spec.shape) == tuple(reference[name].shape), f"{name}: shape {spec.shape} vs model"
