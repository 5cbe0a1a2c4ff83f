"""Engines as Ray actors on several nodes: placed one per node, fed over gloo, and surviving the loss
of a node.

The cluster is simulated on this machine (``ray.cluster_utils.Cluster``: a head without CPUs for the
driver, three one-CPU nodes, each its own raylet). The engines are real transformers engines; the
trainer is this process. The oracle is independent of the engines: Hugging Face greedy decoding, here,
of the very weights that were broadcast.

The scenario, one test because each step needs the state the previous one left:

1. two engines on two distinct nodes through a STRICT_SPREAD placement group;
2. the trainer broadcasts new weights to both over one gloo group;
3. requests are held on both engines (the client paused, "keep") when one engine's node is removed:
   after resume every request completes with the output of the current weights (the client fails
   over; no request is lost);
4. ``EngineRecovery`` restarts the lost engine on a live node, gives it the current weights over a
   gloo group of its own and puts it back in rotation under its id;
5. the next broadcast reaches both engines again;
6. tearing the pool down removes its placement group.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from ray.cluster_utils import Cluster  # noqa: E402
from skyrl_backends.client import EngineRecovery, InferenceEngineClient  # noqa: E402
from skyrl_backends.errors import EngineDeadError  # noqa: E402
from skyrl_backends.ray_wrapper import create_ray_engines, restart_ray_engine  # noqa: E402
from skyrl_backends.weight_sync import connect_broadcast, sync_weights  # noqa: E402

PROMPTS = [[5 + i, 17, 3 * i + 1, 90] for i in range(8)]
MAX_TOKENS = 48
GREEDY = {"max_generate_length": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
# Node death is noticed within a few seconds (Ray's defaults take about 30).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster():
    # Ray's memory monitor judges the whole machine: on a shared CI machine another job's memory would
    # get this test's (small) engines killed. The raylets read the setting from their environment.
    saved = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    nodes = [sim.add_node(num_cpus=1, include_dashboard=False) for _ in range(3)]
    sim.wait_for_nodes()
    ray.init(address=sim.address, log_to_driver=False, configure_logging=False)
    yield sim, nodes
    ray.shutdown()
    sim.shutdown()
    if saved is None:
        os.environ.pop("RAY_memory_monitor_refresh_ms", None)
    else:
        os.environ["RAY_memory_monitor_refresh_ms"] = saved


@pytest.fixture(scope="module")
def trainer_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def perturbed(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: t + 0.5 * t.float().std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)
            for name, t in model.state_dict().items()}


def oracle(model, weights) -> list[list[int]]:
    reference = copy.deepcopy(model)
    reference.load_state_dict(weights)
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def _group_state(group) -> str:
    return ray.util.placement_group_table(group)["state"]


async def _until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_engines_on_other_nodes_survive_losing_a_node(cluster, model_dir, trainer_model):
    sim, nodes = cluster
    engines = create_ray_engines(2, "transformers", model_dir, num_cpus_per_engine=1,
                                 placement_strategy="STRICT_SPREAD", start_timeout_s=600, dtype="float32")
    node_ids = [e.node_id for e in engines]
    head_id = sim.head_node.node_id
    assert len(set(node_ids)) == 2 and head_id not in node_ids, f"engines share a node: {node_ids}"
    first, second = perturbed(trainer_model, 1), perturbed(trainer_model, 2)
    expected_first, expected_second = oracle(trainer_model, first), oracle(trainer_model, second)
    victim = engines[1]
    victim_node = next(n for n in nodes if n.node_id == victim.node_id)
    group = engines[0].placement[0]

    async def scenario():
        client = InferenceEngineClient(engines, max_failovers=3)
        victim_id = client.engine_ids[1]
        # 2. Weights to every node over one gloo group.
        sender = await connect_broadcast(client, backend="gloo", timeout_s=120, group_name="step-1")
        assert await sync_weights(client, first, "broadcast", sender=sender) == [1, 1]
        sender.close()
        for engine in engines:
            assert (await engine.generate(PROMPTS[:2], GREEDY)).response_ids == expected_first[:2]

        # 3. A node dies with requests in flight on it; every request still completes with the
        # current weights. The client is paused ("keep": the engines hold their requests) while the
        # node goes, so that the victim cannot finish its share first, however loaded the machine
        # (a pause for a weight update is also when a trainer's requests sit longest in engines).
        tasks = [asyncio.ensure_future(client.generate([p], GREEDY, request_ids=[f"r{i}"]))
                 for i, p in enumerate(PROMPTS)]
        await _until(lambda: all(h["inflight"] > 0 for h in client.health().values()), "requests on both engines")
        await client.pause_generation("keep")
        held = client.health()[victim_id]["inflight"]
        assert held > 0, "the victim should hold requests while paused"
        await asyncio.to_thread(sim.remove_node, victim_node, False)
        await _until(lambda: not client.health()[victim_id]["healthy"], "the victim's loss to be detected")
        await client.resume_generation()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 600)
        assert [o[0].token_ids for o in outs] == expected_first, "a request was lost or served stale weights"
        health = client.health()
        assert not health[victim_id]["healthy"] and health[victim_id]["failovers"] >= 1

        # 4. The lost engine comes back on a live node with the current weights.
        restores = []

        async def restore(engine):
            group = await connect_broadcast(engine, backend="gloo", timeout_s=120, group_name="restore")
            try:
                restores.append(await sync_weights(engine, first, "broadcast", sender=group))
            finally:
                group.close()

        recovery = EngineRecovery(client, restart=lambda _id, lost: asyncio.to_thread(restart_ray_engine, lost,
                                                                                         start_timeout_s=600),
                                  restore=restore)
        recovered = await recovery.recover()
        assert [r.engine_id for r in recovered] == [victim_id] and restores == [[1]]
        replacement = client.engine(victim_id)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert replacement.node_id in alive and replacement.node_id != victim.node_id
        assert (await replacement.generate(PROMPTS, GREEDY)).response_ids == expected_first
        before = client.health()[victim_id]["sequences_submitted"]
        routed = await client.generate(PROMPTS, GREEDY)  # the batch is split over both engines again
        assert routed.response_ids == expected_first
        assert client.health()[victim_id]["sequences_submitted"] > before, "the restarted engine gets no requests"

        # 5. The next step's broadcast reaches both engines.
        sender = await connect_broadcast(client, backend="gloo", timeout_s=120, group_name="step-2")
        assert await sync_weights(client, second, "broadcast", sender=sender) == [2, 2]
        sender.close()
        for engine in client.engines:
            assert (await engine.generate(PROMPTS, GREEDY)).response_ids == expected_second
        await client.teardown()
        # 6. The pool's placement group goes with its last engine: the nodes' CPUs are free again.
        assert _group_state(group) == "REMOVED"

    asyncio.run(scenario())


def test_an_engine_restarted_as_its_node_dies_starts_on_a_live_node(cluster, model_dir):
    """A restart that comes before Ray has noticed the node's death (it waits for missed health
    checks) is scheduled into the bundle still on that node, where the new actor dies unstarted;
    ``restart_ray_engine`` tries again until Ray has moved the bundle to a live node."""
    sim, nodes = cluster
    spare = sim.add_node(num_cpus=1, include_dashboard=False)  # room for the restart, whatever ran before
    sim.wait_for_nodes()
    [engine] = create_ray_engines(1, "transformers", model_dir, num_cpus_per_engine=1, start_timeout_s=600,
                                  dtype="float32")
    node = next(n for n in [*nodes, spare] if n.node_id == engine.node_id)
    sim.remove_node(node, False)
    replacement = restart_ray_engine(engine, start_timeout_s=600)  # at once: the node is not yet marked dead
    group = replacement.placement[0]
    try:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert replacement.node_id in alive and replacement.node_id != engine.node_id
        out = asyncio.run(replacement.generate(PROMPTS[:1], GREEDY))
        assert len(out.response_ids[0]) == MAX_TOKENS
        # The lost engine's teardown (its actor is dead) leaves its successor's placement group alone.
        with contextlib.suppress(EngineDeadError):
            asyncio.run(engine.teardown())
        assert _group_state(group) == "CREATED"
    finally:
        asyncio.run(replacement.teardown())
    assert _group_state(group) == "REMOVED"
