"""The trainer's side of weight sync, against engines in other processes: a trainer sharded with FSDP2
over two ranks, and LoRA adapters pushed as tensors.

The engines are real engines of the selected backend (``SKYRL_WEIGHT_SYNC_BACKEND``, default
transformers), each behind ``skyrl-backends serve`` in its own OS process, started with LoRA on and
driven over loopback by a :class:`~skyrl_backends.remote.RemoteEngine`; each trainer rank connects
to the same servers by URL.

* Sharded: two trainer ranks (``sharded_trainer.py``, gloo on CPU) hold DTensor shards of the tiny
  model and call ``sync_weights`` collectively, through shared memory and gloo broadcast (packed, per
  tensor, streamed), the ranks writing into shared memory or gathering over the group. After each
  sharded sync the engines serve exactly what they serve after the same weights arrive unsharded from
  one process (tokens and log-probabilities), and the greedy tokens of Hugging Face decoding.
* LoRA: the adapter's tensors go through shared memory and a gloo broadcast; the engines then serve
  the greedy tokens of PEFT's own model with that adapter, replace it under the same name with a new
  version, and refuse a broken adapter before a byte is broadcast.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sharded_trainer  # beside this file: the conftest puts the folder on sys.path
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.remote import RemoteEngine, ServerProcess, connect_engine
from skyrl_backends.weight_sync import connect_broadcast, sync_lora_adapter, sync_weights


@pytest.fixture(scope="module")
def engines(backend, model_dir, num_engines):
    """The engine servers, started together, each with a remote engine that stops it at teardown."""
    servers = [ServerProcess(backend, model_dir, options={"dtype": "float32", "enable_lora": True})
               for _ in range(num_engines)]
    started = []
    try:
        for server in servers:
            started.append(connect_engine(server.wait_ready(), _owned_server=server))
        yield started
    finally:
        for engine in started:
            asyncio.run(engine.teardown())
        for server in servers:
            server.stop()  # those whose engine never connected (stopping twice is harmless)


@pytest.fixture(scope="module")
def ranks(engines, model_dir):
    """Both ranks' results of the whole scenario (one run of the two trainer processes)."""
    return sharded_trainer.launch(engines, model_dir)


def test_sharded_sync_serves_the_unsharded_weights(ranks, engines):
    first, second = ranks
    assert len(first["cases"]) == 5
    expected_version = 0
    for case, other in zip(first["cases"], second["cases"], strict=True):
        label = f"{case['strategy']} {case.get('layout', '')} {case.get('apply', '')} " \
                f"separate_machines={case['separate_machines']}"
        expected_version += 1
        # Every rank returns the versions the engines serve; one sharded sync is one update each.
        assert case["versions"] == other["versions"] == [expected_version] * len(engines), label
        for engine_index, (sharded, unsharded) in enumerate(zip(case["sharded"], case["unsharded"], strict=True)):
            assert sharded["tokens"] == unsharded["tokens"] == case["oracle"], (label, engine_index)
            assert sharded["logprobs"] == unsharded["logprobs"], (label, engine_index)  # the same bytes
            assert sharded["stamped"] == [expected_version] * len(sharded["tokens"]), label
        expected_version += 1  # the unsharded sync that followed
        assert case["unsharded_versions"] == [expected_version] * len(engines)
    # The cases changed the weights, so the engines did not pass by serving the same thing throughout.
    assert len({json.dumps(c["oracle"]) for c in first["cases"]}) > 1


def test_a_rank_calling_differently_fails_on_every_rank(ranks):
    for result in ranks:
        failures = result["failures"]
        strategy = failures["strategy"]
        assert strategy["type"] == "WeightUpdateError"
        assert "'broadcast' here but 'shared_memory' on rank 0" in strategy["problems"]["rank 1: strategy"]
        assert "rank 1: bucket_bytes" in failures["bucket_bytes"]["problems"]
        assert "a model sharded across ranks is sent with one of" in failures["tensors"]["problems"]["strategy"]


def test_an_update_the_engines_refuse_fails_on_every_rank_and_changes_nothing(ranks):
    for result in ranks:
        refused = result["failures"]["engine_refuses"]
        assert refused["type"] == "WeightUpdateError"
        assert "dtype float16 does not match the engine's float32" in refused["problems"]["model.norm.weight"]
    after, before = ranks[0]["failures"]["versions_after_refusal"]
    assert after == before


def test_a_missing_rank_is_named_after_the_timeout_and_the_next_sync_works(ranks):
    missing = ranks[0]["failures"]["missing_rank"]
    assert missing["type"] == "WeightUpdateError"
    assert "missing: rank 1" in missing["problems"]["ranks"]
    first, second = ranks
    assert first["after_missing_rank"] == second["after_missing_rank"]
    assert first["after_missing_rank_served"] == first["after_missing_rank_oracle"]


# -- LoRA adapters from tensors -----------------------------------------------------------------------
PROMPTS = [[5, 6, 7, 8], [100, 42, 17]]
GREEDY = {"max_generate_length": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(model_dir, lora_dir, tmp_path_factory):
    """The tiny model's adapter and a second one (its B matrices doubled), as tensors and config, with
    the greedy tokens PEFT's own model gives with each (the oracle)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(Path(lora_dir) / "adapter_model.safetensors"))
    config = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    doubled = {k: (v * 2 if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    second_dir = tmp_path_factory.mktemp("lora-doubled")
    (second_dir / "adapter_config.json").write_text(json.dumps(config))
    save_file(doubled, str(second_dir / "adapter_model.safetensors"))
    oracles = []
    for folder in (lora_dir, str(second_dir)):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            oracles.append([model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p)).long(),
                                           do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
                            [0, len(p):].tolist() for p in PROMPTS])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    return {"first": (tensors, oracles[0]), "second": (doubled, oracles[1]), "config": config, "base": base}


async def _adapted(engine: RemoteEngine, name: str) -> tuple[list[list[int]], list[int]]:
    out = await engine.generate(PROMPTS, GREEDY, lora_name=name)
    return out.response_ids, [c.lora_version for c in out]


@pytest.mark.parametrize("strategy", ["shared_memory", "broadcast"])
def test_lora_adapter_from_tensors_into_engine_processes(engines, adapters, strategy):
    config = adapters["config"]
    name = f"policy-{strategy}"

    async def scenario():
        await sync_weights(engines, adapters["base"], "shared_memory")  # the base the oracle adapts
        sender = None
        if strategy == "broadcast":
            sender = await connect_broadcast(engines, group_name=f"lora_{strategy}", timeout_s=120)
        try:
            for round_number, which in enumerate(("first", "second"), start=1):
                tensors, oracle = adapters[which]
                versions = await sync_lora_adapter(engines, name, tensors, config, strategy, sender=sender)
                assert versions == [round_number] * len(engines)
                for engine in engines:
                    tokens, stamped = await _adapted(engine, name)
                    assert tokens == oracle, (which, strategy)
                    assert stamped == [round_number] * len(PROMPTS)
            # A broken adapter is refused by every engine before a byte moves; the group stays in step.
            tensors, oracle = adapters["second"]
            broken = {k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj.lora_B" not in k}
            with pytest.raises(WeightUpdateError) as info:
                await sync_lora_adapter(engines, name, broken, config, strategy, sender=sender)
            assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in info.value.problems
            tokens, stamped = await _adapted(engines[-1], name)
            assert tokens == oracle and stamped == [2] * len(PROMPTS)
            first, first_oracle = adapters["first"]
            assert await sync_lora_adapter(engines, name, first, config, strategy, sender=sender) == [3] * len(engines)
            assert (await _adapted(engines[0], name))[0] == first_oracle
        finally:
            if sender is not None:
                sender.close()

    asyncio.run(scenario())


def test_a_peft_models_active_adapter_is_synced_with_its_own_config(engines, adapters, model_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_dir)
    _, oracle = adapters["first"]

    async def scenario():
        await sync_weights(engines, adapters["base"], "shared_memory")
        versions = await sync_lora_adapter(engines, "from-peft-model", model)  # no config: the model's own
        assert versions == [1] * len(engines)
        for engine in engines:
            assert (await _adapted(engine, "from-peft-model"))[0] == oracle
        with pytest.raises(WeightUpdateError) as info:
            await sync_lora_adapter(engines, "from-peft-model", _NamedAdapter(model, "missing"))
        assert "adapter_name" in info.value.problems

    asyncio.run(scenario())


class _NamedAdapter:
    """A PEFT model whose active adapter is ``name`` (one it does not have, to be refused by name)."""

    def __init__(self, model, name: str) -> None:
        self.peft_config, self.active_adapter = model.peft_config, name


# A process of its own: a DTensor needs a default process group, which the test process must not keep.
_SHARDED_ADAPTER = """
import asyncio, os, socket
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync import sync_lora_adapter

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (1,))
adapter = {"base_model.model.layers.0.q_proj.lora_A.weight": distribute_tensor(torch.zeros(4, 8), mesh, [Shard(0)])}
try:
    # No engine is asked anything before the refusal: a bare object stands for one.
    asyncio.run(sync_lora_adapter([object()], "a", adapter, {"r": 4}))
except WeightUpdateError as exc:
    print("refused", sorted(exc.problems), exc.problems["adapter"])
finally:
    dist.destroy_process_group()
"""


def test_a_sharded_adapter_is_refused_before_any_engine_is_asked():
    done = subprocess.run([sys.executable, "-c", _SHARDED_ADAPTER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused ['adapter']" in done.stdout and "gather them first" in done.stdout
