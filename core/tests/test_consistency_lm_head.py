"""The float32 LM head: logits in float32 from a half-precision model, same parameters."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from skyrl_backends.consistency.lm_head import Float32LMHead, check_lm_head_dtype, use_float32_lm_head  # noqa: E402
from skyrl_backends.errors import ConfigError  # noqa: E402


class TinyLM(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.lm_head = head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def test_logits_are_computed_in_float32_from_the_same_weights() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    model = TinyLM(head)
    hidden = torch.randn(5, 64).to(torch.bfloat16)
    half = head(hidden)
    use_float32_lm_head(model)
    full = model.lm_head(hidden)
    exact = hidden.double() @ head.weight.double().T
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert (full.double() - exact).abs().max() < 1e-4
    assert (half.double() - exact).abs().max() > 1e-3  # bfloat16 logits lose digits the float32 head keeps
    assert model.lm_head is head and head.weight.dtype == torch.bfloat16  # parameters untouched


def test_deep_copies_keep_the_float32_head() -> None:
    model = TinyLM(torch.nn.Linear(4, 8).to(torch.bfloat16))
    use_float32_lm_head(model)
    use_float32_lm_head(model)  # idempotent
    clone = copy.deepcopy(model)
    assert isinstance(clone.lm_head, Float32LMHead) and clone.lm_head is not model.lm_head
    assert clone.lm_head(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_other_heads_and_values_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="engine_init_kwargs.lm_head_dtype"):
        use_float32_lm_head(TinyLM(torch.nn.Embedding(4, 8)), "engine_init_kwargs.lm_head_dtype")
    with pytest.raises(ConfigError, match="lm_head_dtype"):
        check_lm_head_dtype("fp32")
    assert check_lm_head_dtype("float32") == "float32"
