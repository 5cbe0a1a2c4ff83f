"""The scheduler-side loader: registered beside the user's loaders, and replaying a recorded load.

The engine's own use of it (CUDA IPC updates into SGLang on a GPU) is proved in
tests/weight_sync/test_gpu.py against SGLang's own update path."""

from __future__ import annotations

import torch
from skyrl_backend_sglang import replayed_load


def test_register_adds_the_loader_once_beside_the_users_own() -> None:
    kwargs = {"custom_weight_loader": ["my_package.load"]}
    replayed_load.register(kwargs)
    replayed_load.register(kwargs)
    assert kwargs["custom_weight_loader"] == ["my_package.load", replayed_load.LOADER]
    empty: dict = {}
    replayed_load.register(empty)
    assert empty == {"custom_weight_loader": [replayed_load.LOADER]}


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor)


def test_the_second_update_of_the_same_buffers_is_replayed() -> None:
    model = TwoLinear()
    bucket = torch.zeros(32)
    named = [("a.weight", bucket[:16].view(4, 4)), ("b.weight", bucket[16:].view(4, 4))]
    for step in range(2):
        bucket.copy_(torch.arange(32.0) * (step + 1))
        replayed_load.load_weights(model, named)
        torch.testing.assert_close(model.b.weight.detach(), bucket[16:].view(4, 4))
    assert (replayed_load._replayed[model].recorded, replayed_load._replayed[model].replayed) == (1, 1)
