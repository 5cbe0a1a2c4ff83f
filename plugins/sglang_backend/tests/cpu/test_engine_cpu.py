"""The sglang backend on real SGLang (CPU path), through the public API, checked against a float32
transformers reference of the same weights."""

from __future__ import annotations

import asyncio

import pytest
import torch

from skyrl_backends.errors import ConfigError, WeightUpdateError

from conftest import run

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300, 2, 17, 99], [11]]
GREEDY = {"max_generate_length": 12, "temperature": 0}


def greedy(engine, prompts=PROMPTS, **extra):
    return run(engine.generate(prompts, {**GREEDY, **extra}))


def test_discovered_through_its_entry_point():
    from skyrl_backends.discovery import all_backends

    backend = all_backends()["sglang"]
    assert backend.status == "ok", backend.reason
    assert backend.distribution == "skyrl-backend-sglang" and backend.engine_version.startswith("0.5.")


def test_greedy_tokens_match_the_reference(engine, reference):
    out = greedy(engine)
    for prompt, completion in zip(PROMPTS, out):
        assert completion.token_ids == reference.greedy(prompt, 12)
        assert completion.finish_reason == "length" and len(completion.token_ids) == 12
        assert completion.text == reference.decode(completion.token_ids)


def test_logprobs_match_teacher_forcing(engine, reference):
    out = run(engine.generate(PROMPTS[:2], {"max_generate_length": 10, "temperature": 1.0, "logprobs": 3}))
    for prompt, completion in zip(PROMPTS, out):
        rows = reference.logprobs(prompt, completion.token_ids)
        expected = rows.gather(-1, torch.tensor(completion.token_ids).unsqueeze(-1)).squeeze(-1)
        assert completion.logprobs == pytest.approx(expected.tolist(), abs=1e-3)
        for row, top in zip(rows, completion.top_logprobs):
            values, ids = torch.topk(row, 3)
            assert sorted(top) == sorted(ids.tolist())
            assert [top[i] for i in ids.tolist()] == pytest.approx(values.tolist(), abs=1e-3)


def test_stop_token_ids_end_with_the_token(engine):
    base = greedy(engine, PROMPTS[:1])[0].token_ids
    stop_id = base[4]
    out = greedy(engine, PROMPTS[:1], stop_token_ids=[stop_id])[0]
    first = base.index(stop_id)
    assert out.token_ids == base[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def _boundary_stop(reference, tokens):
    """A stop string that spans the boundary between two tokens of ``tokens``."""
    for k in range(1, len(tokens) - 1):
        left, right = reference.decode(tokens[:k]), reference.decode(tokens[:k + 1])
        if len(left) >= 2 and len(right) - len(left) >= 2 and "\ufffd" not in right:
            return right[len(left) - 2:len(left) + 1], k + 1
    pytest.fail(f"no token boundary usable for a stop string in {tokens}")


def test_stop_string_across_tokens_is_exact(engine, reference):
    base = greedy(engine, PROMPTS[:1])[0].token_ids
    stop, tokens_needed = _boundary_stop(reference, base)
    full_text = reference.decode(base)
    out = run(engine.generate(PROMPTS[:1], {**GREEDY, "stop": [stop], "logprobs": 0}))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full_text[:full_text.index(stop) + len(stop)]
    assert out.token_ids == base[:tokens_needed]
    assert len(out.logprobs) == len(out.token_ids)


def test_stop_string_inside_one_token_trims_the_text(engine, reference):
    base = greedy(engine, PROMPTS[:1])[0].token_ids
    for k, token in enumerate(base):
        piece = reference.decode([token])
        if len(piece) >= 3 and "\ufffd" not in piece and piece[:2] not in reference.decode(base[:k]):
            stop = piece[:2]  # the token holds more than the string
            break
    else:
        pytest.fail(f"no token of three or more characters in {base}")
    out = run(engine.generate(PROMPTS[:1], {**GREEDY, "stop": [stop]}))[0]
    assert out.token_ids == base[:k + 1]
    assert out.text.endswith(stop) and out.text == reference.decode(base[:k]) + stop


def test_min_new_tokens_masks_stops_and_keeps_reference_logprobs(engine, reference):
    base = greedy(engine, PROMPTS[:1])[0].token_ids
    stops = base[1:3]
    early = greedy(engine, PROMPTS[:1], stop_token_ids=stops)[0]
    assert len(early.token_ids) == 2
    out = greedy(engine, PROMPTS[:1], stop_token_ids=stops, min_new_tokens=6, logprobs=0)[0]
    assert len(out.token_ids) >= 6
    assert not set(out.token_ids[:5]) & set(stops)
    rows = reference.logprobs(PROMPTS[0], out.token_ids)
    expected = rows.gather(-1, torch.tensor(out.token_ids).unsqueeze(-1)).squeeze(-1)
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-3)


def test_seeded_sampling_reproduces_whatever_the_batch(engine, reference):
    params = {"max_generate_length": 16, "temperature": 1.0, "top_p": 0.95, "seed": 1234, "logprobs": 0}
    alone = run(engine.generate(PROMPTS[:1], params))[0]
    batched = run(engine.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], params))[2]
    assert alone.token_ids == batched.token_ids
    other = run(engine.generate(PROMPTS[:1], {**params, "seed": 99}))[0]
    assert other.token_ids != alone.token_ids
    rows = reference.logprobs(PROMPTS[0], alone.token_ids)
    expected = rows.gather(-1, torch.tensor(alone.token_ids).unsqueeze(-1)).squeeze(-1)
    assert alone.logprobs == pytest.approx(expected.tolist(), abs=1e-3)
    samples = run(engine.generate(PROMPTS[:1], {**params, "n": 3}))
    assert len({tuple(c.token_ids) for c in samples}) == 3
    assert samples[0].token_ids == alone.token_ids  # sample j uses seed + j


def test_unseeded_samples_differ(engine):
    out = run(engine.generate(PROMPTS[:1], {"max_generate_length": 16, "temperature": 1.0, "n": 4}))
    assert len({tuple(c.token_ids) for c in out}) > 1


def test_abort_returns_partial_output(engine):
    async def scenario():
        params = {"max_generate_length": 400, "temperature": 1.0, "ignore_eos": True, "logprobs": 0}
        task = asyncio.create_task(engine.generate([PROMPTS[0]], params, request_ids=["abort-me"]))
        state = engine.impl.tm.rid_to_state
        for _ in range(400):  # until SGLang has produced some tokens
            await asyncio.sleep(0.05)
            if "abort-me" in state and len(getattr(state["abort-me"], "output_ids", [])) >= 3:
                break
        await engine.abort(["abort-me"])
        return await task

    out = run(scenario())[0]
    assert out.finish_reason == "abort"
    assert 0 < len(out.token_ids) < 400 and len(out.logprobs) == len(out.token_ids)


def test_an_abort_pause_under_a_running_request_finds_sglang_idle(engine, monkeypatch):
    # SGLang's own abort pause checks once a second whether requests still hold its model-update
    # lock: entered while one runs, it returned a second after the request had ended. The plugin
    # aborts and waits first, so SGLang's pause starts with the lock free.
    tm = engine.impl.tm
    locked_at_entry: list[bool] = []
    real_pause = tm.pause_generation

    async def watched_pause(obj):
        locked_at_entry.append(await tm.model_update_lock.is_locked())
        return await real_pause(obj)

    monkeypatch.setattr(tm, "pause_generation", watched_pause)

    async def scenario():
        params = {"max_generate_length": 400, "temperature": 0.0, "ignore_eos": True}
        task = asyncio.create_task(engine.generate([PROMPTS[0]], params, request_ids=["running"]))
        state = tm.rid_to_state
        for _ in range(400):  # until SGLang has produced some tokens
            await asyncio.sleep(0.05)
            if "running" in state and len(getattr(state["running"], "output_ids", [])) >= 3:
                break
        await engine.pause_generation("abort")
        out = await task
        await engine.resume_generation()
        return out

    out = run(scenario())[0]
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 400
    assert locked_at_entry == [False]


def test_pause_holds_requests_and_resume_finishes_them(engine):
    expected = greedy(engine, PROMPTS[:1], max_generate_length=40)[0].token_ids

    async def scenario():
        await engine.pause_generation()
        task = asyncio.create_task(engine.generate([PROMPTS[0]], {**GREEDY, "max_generate_length": 40}))
        await asyncio.sleep(1.0)
        held = not task.done()
        await engine.resume_generation()
        return held, await task

    held, out = run(scenario())
    assert held
    assert out[0].token_ids == expected and out[0].finish_reason == "length"


def test_weight_update_changes_and_restores_greedy_output(engine, model_dir):
    from safetensors.torch import load_file

    original = load_file(f"{model_dir}/model.safetensors")
    base = greedy(engine)
    version = run(engine.update_weights_from_tensors([("lm_head.weight", -original["lm_head.weight"])]))
    changed = greedy(engine)
    assert changed.response_ids != base.response_ids and changed[0].weight_version == version
    run(engine.update_weights_from_tensors([("lm_head.weight", original["lm_head.weight"])]))
    assert greedy(engine).response_ids == base.response_ids


def test_rejected_update_changes_nothing(engine):
    base = greedy(engine)
    with pytest.raises(WeightUpdateError, match="lm_head.weight"):
        run(engine.update_weights_from_tensors([("lm_head.weight", torch.zeros(3, 3))]))
    assert greedy(engine).response_ids == base.response_ids


def test_shared_memory_sync_of_the_whole_model(engine, model_dir):
    from safetensors.torch import load_file
    from skyrl_backends.weight_sync import sync_weights

    original = load_file(f"{model_dir}/model.safetensors")
    base = greedy(engine)
    scrambled = {k: v.flip(0) for k, v in original.items()}
    run(sync_weights(engine, scrambled, strategy="shared_memory"))
    assert greedy(engine).response_ids != base.response_ids
    run(sync_weights(engine, original, strategy="shared_memory"))
    assert greedy(engine).response_ids == base.response_ids


def test_prefix_cache_reset_and_reuse(engine):
    base = greedy(engine)
    run(engine.reset_prefix_cache())
    assert greedy(engine).response_ids == base.response_ids


def test_misspelled_engine_option_names_the_right_one(model_dir):
    import skyrl_backends as sb

    with pytest.raises(ConfigError, match="attention_backend"):
        sb.create_engine("sglang", model=model_dir, device="cpu", engine_init_kwargs={"attention_backnd": "x"})


def test_abort_while_paused_returns_and_others_stay_paused(engine):
    async def scenario():
        long = {"max_generate_length": 300, "temperature": 0, "ignore_eos": True}
        victim = asyncio.create_task(engine.generate([PROMPTS[0]], long, request_ids=["paused-victim"]))
        keeper = asyncio.create_task(engine.generate([PROMPTS[1]], long, request_ids=["paused-keeper"]))
        state = engine.impl.tm.rid_to_state
        for _ in range(400):
            await asyncio.sleep(0.05)
            if "paused-victim" in state and "paused-keeper" in state:
                break
        await engine.pause_generation()
        await engine.abort(["paused-victim"])
        aborted = await asyncio.wait_for(victim, 60)
        await asyncio.sleep(0.5)
        keeper_held = not keeper.done()
        await engine.resume_generation()
        return aborted, keeper_held, await keeper

    aborted, keeper_held, kept = run(scenario())
    assert aborted[0].finish_reason == "abort" and keeper_held
    assert kept[0].finish_reason == "length" and len(kept[0].token_ids) == 300


def test_broadcast_sync_from_a_trainer_group(engine, model_dir):
    """SGLang's own receiver (init_weights_update_group / update_weights_from_distributed) joins the
    trainer's gloo group made by skyrl_backends.weight_sync; one typed broadcast per tensor."""
    from safetensors.torch import load_file
    from skyrl_backends.weight_sync import connect_broadcast, sync_weights

    original = load_file(f"{model_dir}/model.safetensors")
    scrambled = {k: v.flip(0) for k, v in original.items()}
    base = greedy(engine)

    async def scenario():
        sender = await connect_broadcast(engine, backend="gloo", timeout_s=120)
        try:
            await sync_weights(engine, scrambled, strategy="broadcast", sender=sender)
            changed = await engine.generate(PROMPTS, GREEDY)
            await sync_weights(engine, original, strategy="broadcast", sender=sender)
            restored = await engine.generate(PROMPTS, GREEDY)
        finally:
            sender.close()
        return changed, restored

    changed, restored = run(scenario())
    assert changed.response_ids != base.response_ids
    assert restored.response_ids == base.response_ids


def test_bad_prompts_are_refused_and_the_engine_survives(engine):
    vocab = engine.impl.tm.model_config.vocab_size
    with pytest.raises(ConfigError, match=r"prompt_token_ids\[1\]"):
        greedy(engine, [PROMPTS[0], [1, 2, vocab + 3]])
    with pytest.raises(ConfigError, match="max_model_len"):
        greedy(engine, [[7] * 512])
    assert len(greedy(engine, PROMPTS[:1])[0].token_ids) == 12


def test_response_ends_at_the_context_length(engine):
    prompt = [7] * 500  # max_model_len is 512
    out = run(engine.generate([prompt, PROMPTS[0]], {"max_generate_length": 30, "temperature": 0, "ignore_eos": True}))
    # SGLang's scheduler keeps two positions of the context free (max_req_len = context - 1, and
    # one more), so a response can end two tokens short of the canonical max_model_len - prompt.
    assert out[0].finish_reason == "length" and 10 <= len(out[0].token_ids) <= 12
    assert len(out[1].token_ids) == 30
