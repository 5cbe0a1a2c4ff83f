"""vLLM's RL API, driven by vLLM's own client code, against vLLM's own server and against
``skyrl-backends serve`` over the transformers and vLLM backends (see conftest.py).

The same tests run on all three servers: the trainer side is vLLM's ``HTTPVLLMWeightSyncClient`` and
its trainer-side weight-transfer engine (``WeightTransferTrainerFactory``) with the ``"skyrl"``
backend registered by the vLLM plugin (its gloo broadcast and shared-memory strategies run on CPU);
pausing, sleeping and the other routes are called as a trainer written for ``vllm serve`` calls
them. Bad requests are checked against one table of answers, which vLLM's own server must give too:
so the table is vLLM's behaviour, checked, not an assumption.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import torch
from skyrl_backend_vllm.weight_transfer.trainer import SkyRLTrainerInitInfo  # registers "skyrl"
from transformers import AutoModelForCausalLM
from vllm.distributed.weight_transfer.base import ModuleSource
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

PROMPT = [5, 6, 7, 8, 9]
GREEDY_TOKENS = 12
LONG = 960  # a request still running when the test pauses or aborts it (within the servers' 1024 context)


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_model(model_dir: str) -> torch.nn.Module:
    """The trainer's copy of the model (float32, as the servers serve it)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def scaled(trainer_model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The trainer's model with every weight scaled (other greedy choices), restored afterwards."""
    originals = {n: p.detach().clone() for n, p in trainer_model.named_parameters()}
    with torch.no_grad():
        for p in trainer_model.parameters():
            p.mul_(1.5)
    yield trainer_model
    with torch.no_grad():
        for n, p in trainer_model.named_parameters():
            p.copy_(originals[n])


def send_weights(server: Any, model: torch.nn.Module, strategy: str = "shared_memory") -> None:
    """One weight update the way a trainer written for vLLM sends it."""
    extra: dict[str, Any] = {}
    if strategy == "broadcast":
        extra["world_size"] = 1 + server.get("/get_world_size").json()["world_size"]
    engine = WeightTransferTrainerFactory.trainer_init(
        SkyRLTrainerInitInfo(strategy=strategy, dtype="float32", rank=0, **extra),
        client=HTTPVLLMWeightSyncClient(server.url), source=ModuleSource(model))
    try:
        engine.send_weights()
    finally:
        engine.shutdown()


def complete(server: Any, max_tokens: int = GREEDY_TOKENS, **fields: Any) -> dict[str, Any]:
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **fields}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def assert_greedy(model: torch.nn.Module, tokens: list[int]) -> None:
    """Every token is the argmax of ``model`` given the prompt and the tokens before it."""
    assert tokens
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + tokens])).logits[0]
    expected = logits[len(PROMPT) - 1:-1].argmax(-1).tolist()
    assert tokens == expected, f"not the greedy decode of the trainer's weights: {tokens} vs {expected}"


class Stream:
    """A streamed completion read on a thread: its tokens' count, finish reason, and an event set
    when its first token arrived."""

    def __init__(self, server: Any, max_tokens: int) -> None:
        self.started = threading.Event()
        self.finish_reason: str | None = None
        self.tokens = 0
        self.error: BaseException | None = None
        body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        self._thread = threading.Thread(target=self._read, args=(server.url, body), daemon=True)
        self._thread.start()
        assert self.started.wait(300), "the stream produced no token"

    def _read(self, url: str, body: dict[str, Any]) -> None:
        try:
            with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as response:
                for line in response.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    self.tokens += len(choice.get("token_ids") or [])
                    self.started.set()
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            self.started.set()

    def result(self) -> tuple[int, str | None]:
        self._thread.join(600)
        assert not self._thread.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        return self.tokens, self.finish_reason


# -- weight transfer through vLLM's client --------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["shared_memory", "broadcast"])
def test_vllms_trainer_engine_updates_the_served_weights(server, trainer_model, scaled, strategy):
    before = complete(server)["token_ids"]
    send_weights(server, scaled, strategy)
    after = complete(server)["token_ids"]
    assert after != before, "the update changed nothing the server generates"
    assert_greedy(scaled, after)
    # The next test starts from the checkpoint's weights again.
    with torch.no_grad():
        for p in scaled.parameters():
            p.div_(1.5)
    send_weights(server, scaled, strategy)
    assert complete(server)["token_ids"] == before


def test_a_broadcast_init_that_cannot_complete_fails_and_frees_the_group_for_a_retry(server, trainer_model):
    """A broadcast group that never forms (a world size one rank larger than the server's ranks and
    the trainer) ends at the trainer's timeout, not the server's: the trainer closes its sender, which
    takes its store down, so the server's ranks still joining are released too, and the named port is
    free again. A retry on the same port then updates the weights (it would hang, or find the port
    taken, were the first group left behind)."""
    from skyrl_backends.remote.native.launch import free_port

    port = free_port()
    server_ranks = server.get("/get_world_size").json()["world_size"]
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - the join's timeout, or the server's error, whichever comes first
        WeightTransferTrainerFactory.trainer_init(
            SkyRLTrainerInitInfo(strategy="broadcast", dtype="float32", rank=0, world_size=server_ranks + 2,
                                 master_port=port, timeout_s=5.0),
            client=HTTPVLLMWeightSyncClient(server.url), source=ModuleSource(trainer_model))
    assert time.monotonic() - started < 120, "the failed init did not end near its 5 s timeout"
    engine = WeightTransferTrainerFactory.trainer_init(
        SkyRLTrainerInitInfo(strategy="broadcast", dtype="float32", rank=0, world_size=server_ranks + 1,
                             master_port=port),
        client=HTTPVLLMWeightSyncClient(server.url), source=ModuleSource(trainer_model))
    try:
        engine.send_weights()
    finally:
        engine.shutdown()
    assert_greedy(trainer_model, complete(server)["token_ids"])


def test_finish_weight_update_labels_the_version(server, trainer_model):
    client = HTTPVLLMWeightSyncClient(server.url)
    client.start_weight_update()
    client.finish_weight_update("step-7")
    assert server.get("/weight_info").json() == {"weight_version": "step-7"}
    assert server.post("/update_weight_version", {"new_version": "step-8"}).json() == {
        "success": True, "new_version": "step-8"}
    assert server.get("/weight_info").json() == {"weight_version": "step-8"}


def test_a_rejected_update_changes_neither_weights_nor_version(server):
    from skyrl_backends.types import WeightUpdateRequest
    from skyrl_backends.weight_sync.chunks import plan
    from skyrl_backends.weight_sync.phases import init_info_to_json, update_info_to_json
    from skyrl_backends.weight_sync.shared_memory import SharedMemorySender

    before, version = complete(server)["token_ids"], server.get("/weight_info").json()
    client = HTTPVLLMWeightSyncClient(server.url)
    client.init_weight_transfer_engine(init_info_to_json("shared_memory"))
    wrong = torch.zeros(3, 7)  # no such shape in the model
    sender = SharedMemorySender()
    try:
        layout = plan([("model.embed_tokens.weight", wrong)])
        request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "shared_memory", sender.write(layout))
        client.start_weight_update()
        with pytest.raises(requests.HTTPError) as refused:
            client.update_weights(update_info_to_json(request))
    finally:
        sender.close()
    assert refused.value.response.status_code == 500  # as vLLM: its workers' errors cross collective_rpc
    assert "model.embed_tokens.weight" in refused.value.response.json()["error"]["message"]
    # The refused chunk ended the update, as in vLLM's workers.
    assert server.post("/finish_weight_update").status_code == 500
    assert complete(server)["token_ids"] == before
    assert server.get("/weight_info").json() == version


# -- pausing ---------------------------------------------------------------------------------------------
@pytest.fixture
def resumed_afterwards(server):
    """A pause test that fails half-way must not leave the shared server paused for the next ones."""
    yield
    if server.get("/is_paused").json().get("is_paused"):
        server.post("/resume")


@pytest.mark.usefixtures("resumed_afterwards")
def test_pause_keep_holds_requests_through_an_update_and_resume_finishes_them(server, trainer_model):
    stream = Stream(server, max_tokens=LONG)
    assert server.post("/pause", mode="keep").json() == {"status": "paused"}
    assert stream.finish_reason is None, "the request ended before the pause: nothing was kept"
    assert server.get("/is_paused").json() == {"is_paused": True}
    send_weights(server, trainer_model)  # the same weights: the update must not lose the request
    assert server.post("/resume").json() == {"status": "resumed"}
    assert server.get("/is_paused").json() == {"is_paused": False}
    assert stream.result() == (LONG, "length")


@pytest.mark.usefixtures("resumed_afterwards")
def test_pause_abort_ends_requests_in_flight(server):
    stream = Stream(server, max_tokens=LONG)
    assert server.post("/pause", mode="abort").json() == {"status": "paused"}
    tokens, finish_reason = stream.result()
    assert tokens < LONG and finish_reason == "abort"
    assert server.post("/resume").json() == {"status": "resumed"}
    assert complete(server)["finish_reason"] in ("length", "stop")


@pytest.mark.usefixtures("resumed_afterwards")
def test_pause_wait_returns_once_requests_in_flight_have_finished(server):
    stream = Stream(server, max_tokens=60)
    assert server.post("/pause", mode="wait").json() == {"status": "paused"}
    assert stream.result() == (60, "length")
    assert server.post("/resume").json() == {"status": "resumed"}


# -- memory, information ------------------------------------------------------------------------------------
def test_level_0_sleep_pauses_scheduling_until_woken(server):
    assert server.post("/sleep", level=0).json() == {"status": "sleeping", "level": 0}
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    assert server.post("/wake_up", tags="scheduling").json()["status"] == "awake"
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}
    assert complete(server)["finish_reason"] in ("length", "stop")


def test_sleep_releases_memory_and_wake_up_serves_the_same_weights(server):
    if server.is_vllm_engine:
        pytest.skip("vLLM has no sleep mode on CPU (its server answers and frees nothing; skyrl-backends serve "
                    "refuses, 501, as the vLLM backend declares no sleep there)")
    before = complete(server)["token_ids"]
    assert server.post("/sleep", level=1).json() == {"status": "sleeping", "level": 1}
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    assert server.post("/wake_up").json() == {"status": "awake", "tags": None}
    assert complete(server)["token_ids"] == before


def test_server_info_names_the_dtype_a_trainer_converts_to(server):
    info = server.get("/server_info", config_format="json").json()
    assert info["vllm_config"]["model_config"]["dtype"] == "torch.float32"
    assert server.get("/get_world_size").json() == {"world_size": 1}


# -- bad requests ------------------------------------------------------------------------------------------
# (method, path, query, body) -> (status, error type, param): vLLM's answers; every server must give them.
BAD_REQUESTS = [
    (("POST", "/init_weight_transfer_engine", {}, {}), (400, "Bad Request", "body.init_info")),
    (("POST", "/init_weight_transfer_engine", {}, {"init_info": "x"}), (400, "Bad Request", "body.init_info")),
    (("POST", "/init_weight_transfer_engine", {}, {"init_info": {"strategy": "carrier-pigeon"}}),
     (500, "InternalServerError", None)),
    (("POST", "/update_weights", {}, {"update_info": 5}), (400, "Bad Request", "body.update_info")),
    (("POST", "/update_weights", {}, {"update_info": {"names": []}}), (500, "InternalServerError", None)),
    (("POST", "/finish_weight_update", {}, None), (500, "InternalServerError", None)),
    (("POST", "/finish_weight_update", {}, {"weight_version": 5}), (400, "Bad Request", "body.weight_version")),
    (("POST", "/update_weight_version", {}, {}), (400, "Bad Request", "body.new_version")),
    (("POST", "/pause", {"mode": "bogus"}, None), (400, "Bad Request", "query.mode")),
    (("POST", "/pause", {"clear_cache": "maybe"}, None), (400, "Bad Request", "query.clear_cache")),
    (("POST", "/sleep", {"level": "7"}, None), (400, "Bad Request", "query.level")),
    (("POST", "/weight_checker", {}, {"action": "bogus"}), (400, "Bad Request", "body.action")),
    (("POST", "/start_draft_weight_update", {}, None), (500, "InternalServerError", None)),
]


@pytest.mark.parametrize(("call", "answer"), BAD_REQUESTS, ids=[f"{c[1]}-{i}" for i, (c, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_answered_as_vllm_answers_them(server, call, answer):
    method, path, query, body = call
    before = server.get("/weight_info").json()
    response = requests.request(method, server.url + path, params=query or None, json=body, timeout=600)
    error = response.json().get("error")
    assert isinstance(error, dict), response.text
    assert (response.status_code, error.get("type"), error.get("param")) == answer, response.text
    assert error["code"] == answer[0] and error["message"]
    assert server.get("/weight_info").json() == before
    assert server.get("/is_paused").json() == {"is_paused": False}


@pytest.mark.usefixtures("resumed_afterwards")
def test_abort_requests_ends_every_request_and_leaves_the_pause_state_alone(server):
    # The request is held by a "keep" pause when the abort comes, so that it cannot finish first: a
    # tiny model generates LONG tokens within a second, less than an abort can take to arrive when
    # the machine is loaded.
    stream = Stream(server, max_tokens=LONG)
    assert server.post("/pause", mode="keep").json() == {"status": "paused"}
    assert stream.finish_reason is None, "the request ended before the pause: nothing to abort"
    response = server.post("/abort_requests", {})
    assert response.status_code == 200 and response.json()["status"] == "aborted"
    tokens, finish_reason = stream.result()
    assert tokens < LONG and finish_reason == "abort"
    assert server.get("/is_paused").json() == {"is_paused": True}, "an abort must not resume"
    assert server.post("/resume").json() == {"status": "resumed"}
    # ... nor pause a running server.
    assert server.post("/abort_requests", {}).json()["status"] == "aborted"
    assert server.get("/is_paused").json() == {"is_paused": False}
    assert complete(server)["finish_reason"] in ("length", "stop")
