"""The rules for LoRA adapters sent as tensors (skyrl_backends.lora): which tensors an adapter of a
config must carry for a model, and how each problem is named. Torch-free: the engine's parameters are
described by TensorSpecs, as an engine's weight_specs describes them."""

from __future__ import annotations

import enum

import pytest
from skyrl_backends import capabilities
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.lora import adapter_dtypes, config_to_json, expected_tensors, validate_adapter_request
from skyrl_backends.types import TensorSpec, WeightUpdateRequest

# A two-layer model's parameters, as an engine reports them.
SPECS = {s.name: s for s in [
    TensorSpec("model.embed_tokens.weight", (50, 16), "bfloat16"),
    *[TensorSpec(f"model.layers.{i}.self_attn.{p}.weight", shape, "bfloat16")
      for i in range(2) for p, shape in (("q_proj", (16, 16)), ("k_proj", (8, 16)), ("v_proj", (8, 16)),
                                         ("o_proj", (16, 16)))],
    *[TensorSpec(f"model.layers.{i}.mlp.{p}.weight", shape, "bfloat16")
      for i in range(2) for p, shape in (("gate_proj", (32, 16)), ("up_proj", (32, 16)), ("down_proj", (16, 32)))],
    TensorSpec("model.layers.0.input_layernorm.weight", (16,), "bfloat16"),
    TensorSpec("lm_head.weight", (50, 16), "bfloat16"),
]}
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": False,
          "bias": "none", "modules_to_save": None}
PREFIX = "base_model.model.model.layers"


def request_of(expected: dict[str, TensorSpec], **changes) -> WeightUpdateRequest:
    specs = dict(expected)
    for name, change in changes.items():
        if change is None:
            specs.pop(name)
        else:
            specs[name] = change
    return WeightUpdateRequest([s.name for s in specs.values()], [s.dtype for s in specs.values()],
                               [s.shape for s in specs.values()], "shared_memory", None)


def test_a_list_of_targets_selects_modules_by_their_last_names():
    expected = expected_tensors(CONFIG, SPECS)
    assert set(expected) == {f"{PREFIX}.{i}.self_attn.{p}.lora_{ab}.weight"
                             for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    assert expected[f"{PREFIX}.0.self_attn.v_proj.lora_A.weight"].shape == (4, 16)  # (r, in)
    assert expected[f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"].shape == (8, 4)  # (out, r)
    assert expected[f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"].dtype == "bfloat16"  # the module's dtype


def test_all_linear_and_regular_expressions_follow_peft():
    every = expected_tensors({**CONFIG, "target_modules": "all-linear"}, SPECS)
    assert len(every) == 2 * 7 * 2  # every projection of both layers, never the embeddings or the head
    assert not any("embed" in n or "lm_head" in n for n in every)
    only_first = expected_tensors({**CONFIG, "target_modules": r"model\.layers\.0\..*_proj"}, SPECS)
    assert len(only_first) == 7 * 2 and all(".layers.0." in n for n in only_first)


def test_a_complete_adapter_passes_and_each_problem_is_named():
    expected = expected_tensors(CONFIG, SPECS)
    validate_adapter_request(request_of(expected), CONFIG, SPECS, max_rank=8)
    a0, b1 = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"
    stray = f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"
    bad = request_of(expected, **{a0: None, b1: TensorSpec(b1, (4, 8), "bfloat16"),
                                  stray: TensorSpec(stray, (4, 16), "bfloat16")})
    with pytest.raises(WeightUpdateError) as info:
        validate_adapter_request(bad, CONFIG, SPECS, max_rank=8)
    problems = info.value.problems
    assert problems[a0].startswith("missing")
    assert "shape (4, 8) does not match (8, 4)" in problems[b1]
    assert "not a tensor of this adapter" in problems[stray]
    wrong_dtype = request_of(expected, **{a0: TensorSpec(a0, (4, 16), "float32")})
    with pytest.raises(WeightUpdateError, match="dtype float32 does not match the engine's bfloat16"):
        validate_adapter_request(wrong_dtype, CONFIG, SPECS)


def test_unprefixed_names_get_a_did_you_mean():
    expected = expected_tensors(CONFIG, SPECS)
    plain = {name.removeprefix("base_model.model."): s for name, s in expected.items()}
    request = WeightUpdateRequest(list(plain), [s.dtype for s in plain.values()], [s.shape for s in plain.values()])
    with pytest.raises(WeightUpdateError) as info:
        validate_adapter_request(request, CONFIG, SPECS)
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert f"did you mean 'base_model.model.{name}'" in info.value.problems[name]


@pytest.mark.parametrize("change, field, words", [
    ({"r": 0}, "lora_config.r", "positive integer"),
    ({"r": 16}, "lora_config.r", "max_lora_rank 8"),
    ({"lora_alpha": -1}, "lora_config.lora_alpha", "positive number"),
    ({"target_modules": []}, "lora_config.target_modules", "give module names"),
    ({"target_modules": "q_proj("}, "lora_config.target_modules", "not a regular expression"),
    ({"target_modules": ["nothing_like_this"]}, "lora_config.target_modules", "matches no linear layer"),
    ({"target_modules": ["embed_tokens"]}, "lora_config.target_modules (model.embed_tokens)", "not embeddings"),
    ({"use_dora": True}, "lora_config.use_dora", "plain LoRA"),
    ({"modules_to_save": ["lm_head"]}, "lora_config.modules_to_save", "plain LoRA"),
    ({"rank_pattern": {"q_proj": 2}}, "lora_config.rank_pattern", "plain LoRA"),
    ({"peft_type": "IA3"}, "lora_config.peft_type", "only LoRA"),
    ({"use_rslora": "yes"}, "lora_config.use_rslora", "true or false"),
])
def test_each_config_problem_names_its_field(change, field, words):
    with pytest.raises(WeightUpdateError) as info:
        expected_tensors({**CONFIG, **change}, SPECS, max_rank=8)
    assert words in info.value.problems[field], info.value.problems


def test_a_peft_config_object_becomes_json():
    class TaskType(enum.Enum):
        CAUSAL_LM = "CAUSAL_LM"

    class FakeLoraConfig:  # test double: what peft's LoraConfig.to_dict() returns (sets, enumerations)
        def to_dict(self):
            return {"r": 4, "target_modules": {"v_proj", "q_proj"}, "task_type": TaskType.CAUSAL_LM}

    assert config_to_json(FakeLoraConfig()) == {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                                "task_type": "CAUSAL_LM"}


def test_adapter_tensors_travel_in_their_modules_dtype():
    names = [f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]
    assert adapter_dtypes(names, SPECS) == {names[0]: "bfloat16", names[1]: "bfloat16"}


def test_the_capability_names_its_strategies_and_its_hook():
    caps = Capabilities(lora=True, lora_from_tensors=("tensors", "broadcast"))
    assert capabilities.LORA_FROM_TENSORS(caps) and capabilities.lora_from_tensors_by("broadcast")(caps)
    assert not capabilities.lora_from_tensors_by("cuda_ipc")(caps)
    assert "lora_from_tensors(tensors,broadcast)" in caps.names()
    assert any("skyrl_backends_load_lora_adapter_from_tensors" in p
               for p in capabilities.missing_hooks(caps, ["skyrl_backends_load_lora_adapter"]))
    # Without LoRA at all, the missing capability reported is LoRA itself.
    assert capabilities.missing(Capabilities(), [capabilities.LORA_FROM_TENSORS]) == ["lora"]
