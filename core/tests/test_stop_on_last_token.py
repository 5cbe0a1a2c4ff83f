"""A stop token id or EOS that is also the last allowed token is a stop, whatever the engine reports
(SGLang 0.5.17 reports "length"): the rule the SGLang backend and the SGLang-server driver share."""

import json
from types import SimpleNamespace

from skyrl_backends.checkpoint import declared_eos_token_ids
from skyrl_backends.remote.native import sglang as sglang_server
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import stop_on_last_token

EOS = [2]


def test_eos_as_the_last_allowed_token_is_a_stop():
    assert stop_on_last_token("length", [5, 6, 2], None, SamplingParams(), EOS) == ("stop", 2)


def test_a_stop_token_id_as_the_last_allowed_token_is_a_stop_naming_it():
    params = SamplingParams(stop_token_ids=[6])
    assert stop_on_last_token("length", [5, 6], None, params, EOS) == ("stop", 6)


def test_ignored_eos_and_ordinary_tokens_stay_length():
    assert stop_on_last_token("length", [5, 2], None, SamplingParams(ignore_eos=True), EOS) == ("length", None)
    assert stop_on_last_token("length", [5, 7], None, SamplingParams(), EOS) == ("length", None)
    assert stop_on_last_token("length", [], None, SamplingParams(), EOS) == ("length", None)


def test_other_finish_reasons_are_kept():
    assert stop_on_last_token("stop", [5, 2], 2, SamplingParams(), EOS) == ("stop", 2)
    assert stop_on_last_token("abort", [5, 2], None, SamplingParams(), EOS) == ("abort", None)


def test_declared_eos_ids_come_from_both_configs_and_need_a_readable_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert declared_eos_token_ids(tmp_path) == {2, 9}
    assert declared_eos_token_ids(tmp_path / "elsewhere") == set() and declared_eos_token_ids(None) == set()


def test_the_sglang_server_driver_reports_eos_as_the_last_allowed_token_as_a_stop():
    server = SimpleNamespace(eos_token_ids={2}, text=SimpleNamespace(of=lambda tokens, reason: None))
    completion = sglang_server.SGLangServerEngine._completion
    meta = {"finish_reason": {"type": "length", "length": 3}}
    eos_last = completion(server, [5, 6, 2], meta, None, "r", SamplingParams(max_generate_length=3))
    assert (eos_last.finish_reason, eos_last.stop_reason) == ("stop", 2)
    other_last = completion(server, [5, 6, 7], meta, None, "r", SamplingParams(max_generate_length=3))
    assert (other_last.finish_reason, other_last.stop_reason) == ("length", None)
