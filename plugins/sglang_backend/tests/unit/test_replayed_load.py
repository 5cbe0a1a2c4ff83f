"""The scheduler-side loader: registered beside the user's loaders, and replaying a recorded load.

The engine's own use of it (CUDA IPC updates into SGLang on a GPU) is proved in
tests/weight_sync/test_gpu.py against SGLang's own update path."""

from __future__ import annotations

import torch
from skyrl_backend_sglang import replayed_load
from skyrl_backends.weight_sync.chunks import iter_weight_chunks, pack_into


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
        self.b = torch.nn.Linear(4, 6, bias=False)

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor)


def test_buckets_handed_whole_are_loaded_then_replayed_with_new_values() -> None:
    model = TwoLinear()
    weights = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(6, 4)}
    chunks = list(iter_weight_chunks(weights, bucket_bytes=64))  # two buckets: one tensor each
    assert len(chunks) == 2
    pairs = replayed_load.bucket_pairs([(c.manifest, c.buffer) for c in chunks])
    for step in range(3):
        new = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(step)) for name, t in weights.items()}
        for chunk in chunks:  # the sender writes the next weights into the same buffers
            pack_into(chunk.buffer, chunk.manifest, new)
        replayed_load.load_weights(model, pairs)
        torch.testing.assert_close(model.a.weight.detach(), new["a.weight"], rtol=0, atol=0)
        torch.testing.assert_close(model.b.weight.detach(), new["b.weight"], rtol=0, atol=0)
    assert (replayed_load._replayed[model].recorded, replayed_load._replayed[model].replayed) == (1, 2)
