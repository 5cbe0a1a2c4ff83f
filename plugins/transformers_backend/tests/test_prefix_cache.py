"""The reference engine's prefix cache: hits on multi-turn prompts, exact outputs, invalidation."""

import pytest
from conftest import run

import skyrl_backends as sb

GREEDY = {"max_generate_length": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}


@pytest.fixture
def engines(model_dir):
    cached = sb.create_engine("transformers", model=model_dir, dtype="float32", enable_lora=True)
    plain = sb.create_engine("transformers", model=model_dir, dtype="float32", enable_prefix_caching=False)
    yield cached, plain
    run(cached.teardown())
    run(plain.teardown())


def test_second_turn_reuses_the_first_and_outputs_are_unchanged(engines):
    cached, plain = engines
    assert cached.capabilities.prefix_caching and not plain.capabilities.prefix_caching
    turn1 = [5, 6, 7, 8, 9]
    first = run(cached.generate([turn1], GREEDY))[0]
    turn2 = turn1 + first.token_ids + [30, 31, 32]
    stats = cached.impl.prefix_cache.stats
    hits_before = stats.hit_tokens
    second = run(cached.generate([turn2, [40, 41]], GREEDY))
    # every token fed in turn 1 (prompt and all but the last response token) was reused
    assert stats.hit_tokens - hits_before == len(turn1) + len(first.token_ids) - 1
    reference = run(plain.generate([turn2, [40, 41]], GREEDY))
    assert second.response_ids == reference.response_ids
    for got, want in zip(second, reference):
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-4


def test_weight_update_and_reset_invalidate_cached_prefixes(engines, hf_model):
    import torch

    cached, _ = engines
    prompt = [5, 6, 7, 8, 9, 10]
    run(cached.generate([prompt], GREEDY))
    assert len(cached.impl.prefix_cache) > 0
    torch.manual_seed(1)
    noisy = [(n, p.detach() + 0.3 * torch.randn_like(p)) for n, p in hf_model.named_parameters()]
    run(cached.update_weights_from_tensors(noisy))
    assert len(cached.impl.prefix_cache) == 0
    after_update = run(cached.generate([prompt + [11]], GREEDY))[0]
    fresh = sb.create_engine("transformers", model=cached.config.model, dtype="float32", enable_prefix_caching=False)
    run(fresh.update_weights_from_tensors(noisy))
    assert after_update.token_ids == run(fresh.generate([prompt + [11]], GREEDY))[0].token_ids
    run(fresh.teardown())
    run(cached.reset_prefix_cache())
    assert len(cached.impl.prefix_cache) == 0


def test_adapters_never_share_prefixes(engines, model_dir):
    cached, plain = engines
    prompt = [5, 6, 7, 8]
    base = run(cached.generate([prompt], GREEDY))[0]
    run(cached.load_lora_adapter("a", f"{model_dir}/lora"))
    continued = prompt + base.token_ids
    with_adapter = run(cached.generate([continued], GREEDY, lora_name="a"))[0]
    reference = sb.create_engine("transformers", model=model_dir, dtype="float32", enable_lora=True,
                                 enable_prefix_caching=False)
    run(reference.load_lora_adapter("a", f"{model_dir}/lora"))
    assert with_adapter.token_ids == run(reference.generate([continued], GREEDY, lora_name="a"))[0].token_ids
    run(reference.teardown())


def test_lru_eviction_keeps_the_token_budget():
    import torch

    from skyrl_backend_transformers.prefix_cache import PrefixCache

    cache = PrefixCache(max_tokens=10)
    kv = lambda n: [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]  # noqa: E731
    cache.insert("ns", [1, 2, 3, 4], kv(4))
    cache.insert("ns", [7, 8, 9, 10, 11], kv(5))
    assert cache.lookup("ns", [1, 2, 3, 9])[0] == 3
    cache.insert("ns", [20, 21, 22], kv(3))  # 12 tokens > 10: the least recently used entry goes
    assert cache.lookup("ns", [7, 8, 9, 10, 11, 12])[0] == 0
    assert cache.lookup("ns", [1, 2, 3, 4, 5])[0] == 4
    assert cache.lookup("other", [1, 2, 3, 4, 5])[0] == 0
    cache.insert("ns", [1, 2, 3, 4, 5, 6], kv(6))  # supersedes its own prefix [1, 2, 3, 4]
    assert len([k for k in cache._entries if k[0] == "ns"]) == 2
