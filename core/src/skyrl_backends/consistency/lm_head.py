"""An LM head that computes its logits in float32 while the model stays in half precision.

The last projection turns a hidden state into one logit per vocabulary entry; in bfloat16 each logit
keeps about three significant digits, so log-probabilities that an engine and a trainer compute from
the same weights drift apart by tenths of a nat at single positions. Computing that one projection in
float32 (the weights upcast exactly, the products accumulated in float32) removes most of the gap at
the cost of one float32 matmul per step. TRL (``cast_lm_head_to_fp32``), vLLM
(``hf_overrides={"head_dtype": "float32"}``) and SGLang (``enable_fp32_lm_head``) offer the same.

The weights themselves are not converted, so parameter names, shapes and dtypes (what weight updates
are checked against) do not change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from skyrl_backends.errors import ConfigError

LM_HEAD_DTYPES = ("model", "float32")


class Float32LMHead(torch.nn.Linear):
    """A ``Linear`` output projection whose forward runs in float32 (same parameters)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden_states.float(), self.weight.float(), bias)


def use_float32_lm_head(model: Any, field: str = "lm_head_dtype") -> None:
    """Make ``model``'s output projection (``get_output_embeddings()``) compute in float32, in place.

    Only a plain ``torch.nn.Linear`` head qualifies (a quantized head or one wrapped by an adapter
    does not); anything else raises :class:`ConfigError` naming ``field``.
    """
    head = model.get_output_embeddings()
    if isinstance(head, Float32LMHead):
        return
    if type(head) is not torch.nn.Linear:
        raise ConfigError(field, f"a float32 LM head needs a plain torch.nn.Linear output projection; this "
                                 f"model's is {type(head).__name__}. Leave {field} at 'model'.")
    # Swapping the class keeps the module, its parameters and hooks; a deep copy copies it as is.
    head.__class__ = Float32LMHead


def check_lm_head_dtype(value: Any, field: str = "lm_head_dtype") -> str:
    if value not in LM_HEAD_DTYPES:
        raise ConfigError.out_of_range(field, value, " or ".join(repr(v) for v in LM_HEAD_DTYPES))
    return str(value)
