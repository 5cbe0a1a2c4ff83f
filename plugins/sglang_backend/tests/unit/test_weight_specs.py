"""Weight specs in the trainer's naming, from the tiny model's config (no engine needed)."""

import os

import pytest

from skyrl_backend_sglang.engine import hf_weight_specs

MODEL = os.environ.get("SKYRL_TEST_MODEL")


@pytest.mark.skipif(not MODEL, reason="SKYRL_TEST_MODEL (the tiny model) is not set")
def test_specs_match_the_hugging_face_state_dict():
    from safetensors import safe_open

    specs = {s.name: s for s in hf_weight_specs(MODEL, "bfloat16")}
    with safe_open(os.path.join(MODEL, "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert set(specs) == set(saved)
    assert all(specs[k].shape == saved[k] for k in saved)
    assert {s.dtype for s in specs.values()} == {"bfloat16"}
