"""The pure parts of driving an engine's own server (skyrl_backends.remote.native): how canonical
parameters become each server's JSON, how its answers become completions, how servers are started
and addressed. The protocols themselves are tested against real servers in tests/native_protocols
and by the conformance suite's server columns."""

from __future__ import annotations

import pytest
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.remote.connect import connect_engine
from skyrl_backends.remote.native import is_same_host, server_url
from skyrl_backends.remote.native import sglang as sglang_server
from skyrl_backends.remote.native import vllm as vllm_server
from skyrl_backends.remote.native.launch import server_command
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import StopStringMatcher
from skyrl_backends.types import TokenVersions


def test_vllm_sampling_json_covers_every_canonical_field():
    params = SamplingParams(max_generate_length=9, temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1,
                            repetition_penalty=1.2, logprobs=3, stop=("x",), stop_token_ids=(7,), min_new_tokens=2,
                            ignore_eos=True, seed=4)
    body = vllm_server.Translation(19).skyrl_backends_translate_sampling_params(params)
    assert body == {"n": 1, "max_tokens": 9, "min_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 0,
                    "min_p": 0.1, "repetition_penalty": 1.2, "logprobs": 4, "stop_token_ids": [7], "ignore_eos": True,
                    "seed": 4, "skip_special_tokens": True, "detokenize": True, "stop": ["x"],
                    "include_stop_str_in_output": True}
    assert vllm_server.Translation(19).skyrl_backends_translate_sampling_params(
        SamplingParams(logprobs=0))["logprobs"] == 0
    with pytest.raises(SamplingParamsError, match="logprobs"):
        vllm_server.Translation(19).skyrl_backends_translate_sampling_params(SamplingParams(logprobs=20))


def test_vllm_top_logprobs_keep_the_top_n_by_rank_whatever_the_sampled_token():
    # vLLM lists the sampled token first (here rank 5), then the candidates; one more was asked for.
    top = [{"token_id": 9, "logprob": -3.0, "rank": 5}, {"token_id": 1, "logprob": -0.1, "rank": 1},
           {"token_id": 2, "logprob": -0.5, "rank": 2}, {"token_id": 3, "logprob": -1.0, "rank": 3}]
    content = [{"token_id": 9, "logprob": -3.0, "rank": 5, "top_logprobs": top}]
    chosen, top = vllm_server._logprobs([9], {"content": content}, 2)
    assert chosen == [-3.0] and top == [{1: -0.1, 2: -0.5}]
    assert vllm_server._logprobs([9], {"content": content}, 0) == ([-3.0], None)
    assert vllm_server._logprobs([9], {"content": content}, None) == (None, None)


def test_weight_version_spans_become_token_versions():
    choice = {"weight_versions": [{"version": "default", "start": 0, "end": 3}, {"version": "4", "start": 3, "end": 5}]}
    assert vllm_server._versions(choice, 5, 0, False) == TokenVersions(((0, 0), (3, 4)), 5)
    # No spans: the version the request started under, only while no update has begun since.
    assert vllm_server._versions({}, 5, 2, True) == TokenVersions.uniform(5, 2)
    assert vllm_server._versions({}, 5, 2, False) is None
    assert sglang_server._versions({"weight_versions": choice["weight_versions"]}, 4, 0, False) == TokenVersions(
        ((0, 0), (3, 4)), 4)
    assert vllm_server.version_number("default") == 0 and vllm_server.version_number("12") == 12


def test_sglang_sampling_json_leaves_stops_it_cannot_honour_to_this_side():
    translate = sglang_server.Translation().skyrl_backends_translate_sampling_params
    body = translate(SamplingParams(max_generate_length=5, stop_token_ids=(3, 2), min_new_tokens=1))
    assert body["stop_token_ids"] == [2, 3] and body["no_stop_trim"] and body["min_new_tokens"] == 1
    # SGLang's ignore_eos disables its stop ids: they are watched here instead.
    assert "stop_token_ids" not in translate(SamplingParams(stop_token_ids=(3,), ignore_eos=True))
    assert "stop" not in translate(SamplingParams(stop=("x",)))


def test_sglang_stops_at_the_first_watched_id_or_completed_string():
    decode = {1: "a", 2: "b", 3: "c"}
    matcher = StopStringMatcher(["bc"], lambda ids: "".join(decode[i] for i in ids))
    assert sglang_server._first_stop(matcher, set(), [1, 2, 3, 1], 0) == (3, "bc")
    assert sglang_server._first_stop(None, {2}, [1, 2, 3], 0) == (2, 2)
    assert sglang_server._first_stop(None, {2}, [1, 3], 0) is None


def test_sglang_top_logprobs_and_chosen_come_from_meta_info():
    meta = {"output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]],
            "output_top_logprobs": [[[-1.0, 5, None], [-1.5, 7, None]], [[-0.5, 8, None], [-2.0, 6, None]]]}
    assert sglang_server._logprobs(meta, 0, 2, 1) == ([-1.0, -2.0], [{5: -1.0}, {8: -0.5}])
    assert sglang_server._logprobs(meta, 1, 2, 0) == ([-2.0], None)


@pytest.mark.parametrize("declared, model_type, served", [
    ({"dtype": "float32"}, "qwen2", "float16"),        # SGLang's "auto": float32 is served in half precision
    ({"torch_dtype": "float32"}, "gemma2", "bfloat16"),  # ... in bfloat16 for Gemma
    ({}, "qwen2", "float16"),                          # nothing declared counts as float32
    ({"dtype": "bfloat16"}, "qwen2", "bfloat16"),
    ({"torch_dtype": "float16"}, "llama", "float16"),
])
def test_an_sglang_server_on_auto_is_described_by_sglangs_own_rule(tmp_path, declared, model_type, served):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **declared}))
    assert sglang_server._served_dtype({"dtype": "auto"}, str(tmp_path)) == served
    assert sglang_server._served_dtype({"dtype": "half"}, str(tmp_path)) == "float16"
    assert sglang_server._served_dtype({"dtype": "float"}, str(tmp_path)) == "float32"


def test_server_addresses_and_the_same_host_rule(monkeypatch):
    monkeypatch.delenv("SKYRL_SERVER_SAME_HOST", raising=False)
    assert server_url("10.0.0.2:8000") == "http://10.0.0.2:8000"
    assert server_url("https://h:1/ignored/path") == "https://h:1"
    with pytest.raises(ConfigError, match="remote_inference_engine_urls"):
        server_url("ftp://h:1")
    assert is_same_host("http://127.0.0.1:8000") and is_same_host("http://localhost:1")
    assert not is_same_host("http://10.0.0.2:8000")
    monkeypatch.setenv("SKYRL_SERVER_SAME_HOST", "1")
    assert is_same_host("http://10.0.0.2:8000")


def test_server_commands_carry_what_the_engine_contract_needs():
    command, env = server_command("vllm", "/m", 8001, {"dtype": "float32", "max_model_len": 512, "enable_lora": True,
                                                       "max_lora_rank": 8}, "py")
    assert command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enable-scale-out", "--enable-lora"):
        assert flag in command
    assert command[command.index("--logprobs-mode") + 1] == "raw_logprobs"
    assert command[command.index("--max-model-len") + 1] == "512"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    command, env = server_command("sglang", "/m", 8002, {"device": "cpu", "seed": 3}, "py")
    assert "--skip-tokenizer-init" in command and command[command.index("--random-seed") + 1] == "3"
    assert env["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and "--attention-backend" in command
    with pytest.raises(ConfigError, match="max_num_seqs"):
        server_command("vllm", "/m", 1, {"max_num_seqs": 4}, "py")


def test_the_remote_protocol_is_a_checked_config_field():
    assert GeneratorConfig(remote_inference_engine_protocol="vllm").remote_inference_engine_protocol == "vllm"
    with pytest.raises(ConfigError, match="remote_inference_engine_protocol"):
        GeneratorConfig(remote_inference_engine_protocol="triton")
    with pytest.raises(ConfigError, match="sglang"):
        connect_engine("127.0.0.1:1", dialect="triton")


def test_an_sglang_server_abort_pause_ends_its_requests_before_asking_sglang_to_pause():
    # SGLang's own abort pause re-checks its lock once a second: the driver aborts and awaits its
    # requests first. A test double stands in for the HTTP server (routing logic only).
    import asyncio

    engine = object.__new__(sglang_server.SGLangServerEngine)
    engine._inflight = {"r1", "r2"}
    engine._pause_mode = None
    calls: list[str] = []

    async def abort_on_server(request_ids):
        calls.append(f"abort {request_ids}")

        async def requests_end():  # the streams come back a little later
            await asyncio.sleep(0.01)
            engine._inflight.clear()
        asyncio.get_running_loop().create_task(requests_end())

    async def post(path, body=None, params=None):
        calls.append(f"{path} {body} inflight={sorted(engine._inflight)}")

    engine.abort_on_server = abort_on_server
    engine._post = post
    asyncio.run(engine.skyrl_backends_pause_generation(mode="abort", recompute=False))
    assert calls == ["abort None", "/pause_generation {'mode': 'abort'} inflight=[]"]
    assert engine._pause_mode == "abort"

    calls.clear()
    engine._inflight = {"r3"}
    asyncio.run(engine.skyrl_backends_pause_generation(mode="keep", recompute=False))
    assert calls == ["/pause_generation {'mode': 'in_place'} inflight=['r3']"]  # kept, not aborted
