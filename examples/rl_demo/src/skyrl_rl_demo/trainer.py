"""The RL training loop: an engine chosen by name, multi-turn rollouts, GRPO, weight sync.

One training step, in the design's order (colocated mode, where trainer and engine share the
device and the engine gives its memory back while the trainer works)::

    1. wake_up(["kv_cache"])      the engine takes back its KV cache memory
    2. generate                   the agent loop plays every episode through the engine
    3. sleep(level)               the engine releases its memory (at level 2 its weights too)
    4. update                     GRPO on the trainer's own copy of the model (torch, AdamW)
    5. wake_up(["weights"])       the engine takes back its weight memory
    6. sync weights               the trainer's weights go into the engine; back to 1

At a sleep level where the backend discards its weights (level 2 on the transformers and vLLM
backends, every sleep on SGLang) the engine refuses to generate until step 6 has delivered every
parameter, so each step checks the sync end to end. Without ``colocate`` steps 1, 3 and 5 are
skipped; the sync still happens every step.

Before its update the trainer recomputes, teacher-forced, the log-probabilities of the tokens the
engine sampled; both hold the same weights then, so they must agree (``logprob_abs_diff_max``). The
trainer keeps its weights and optimizer in float32 and, by default, computes its forward in the
dtype the engine serves (``trainer_compute_dtype="engine"``: autocast): an engine in bfloat16 holds
the trainer's weights rounded to bfloat16, and a float32 forward of the unrounded weights would
differ from it by far more than kernels do (docs/demo.md).

Asynchronous mode (``async_rollouts``, ``--async``): the engine generates step t+1's rollout while the
trainer trains on step t's, and the new weights reach the engine while that generation runs (an
in-flight update: the engine labels every token with the version that produced it)::

    rollout 1 = generate                               (weights v0)
    step t:   rollout t = await the pending generation (tokens of v(t-2) and v(t-1))
              start generating rollout t+1              (on v(t-1), in the background)
              update on rollout t                       (the policy becomes v(t), in a worker thread)
              sync v(t) into the engine                 (rollout t+1's later tokens come from v(t))

So a rollout's tokens are at most one version behind the policy that trains on them. Stale tokens
are weighted by the clipped importance ratio, not dropped (see :mod:`skyrl_rl_demo.grpo`); the
on-policy ones must agree with the trainer's recomputation as in the synchronous loop. The engine
stays awake (no sleep/wake cycle: it generates while the trainer trains).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import skyrl_backends
import torch
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.sampling import SamplingParams

from skyrl_rl_demo import grpo
from skyrl_rl_demo.agent_loop import ChatTokens, Generates, RolloutBatch, run_agent_loops
from skyrl_rl_demo.env import SayTheDigitEnv, sample_targets
from skyrl_rl_demo.metrics import MetricsCSV, summarize
from skyrl_rl_demo.plots import plot_reward_curve
from skyrl_rl_demo.weight_transfer import WeightSync, choose_strategy

COMPUTE_DTYPES = ("engine", "float32")


@dataclass
class TrainerConfig:
    """Everything a run depends on. The defaults are the ``make demo`` run."""

    model: str
    backend: str = skyrl_backends.DEFAULT_BACKEND
    out_dir: str = "out/demo"
    steps: int = 200
    seed: int = 0
    prompts_per_step: int = 8
    group_size: int = 8
    turns: int = 2
    digits: str = "258"  # the digits the task asks for (all ten: much harder for the tiny model)
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0
    clip_ratio: float = 0.2
    entropy_coef: float = 0.02
    max_generate_length: int = 1  # answers are one token: a digit
    temperature: float = 1.0
    colocate: bool = True
    sleep_level: int | None = None  # None: the highest level the backend supports
    num_engines: int = 1
    weight_sync: str = "auto"  # auto, tensors, shared_memory, cuda_ipc (see weight_transfer)
    trainer_device: str = "cpu"
    engine_options: dict[str, Any] = field(default_factory=dict)
    async_rollouts: bool = False  # generate step t+1 while training on step t (see the module docstring)
    max_staleness: int = 1  # tokens more versions behind the trained policy than this are dropped
    # The dtype of the trainer's forward: "engine" (the dtype the engine serves its weights in) or
    # "float32". Weights and optimizer state stay float32 either way.
    trainer_compute_dtype: str = "engine"

    def __post_init__(self) -> None:
        if self.async_rollouts and self.colocate:
            raise ValueError("async_rollouts needs colocate=False: the engine generates while the trainer trains, "
                             "so it cannot sleep then")
        if self.trainer_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"trainer_compute_dtype must be one of {list(COMPUTE_DTYPES)}, got "
                             f"{self.trainer_compute_dtype!r}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        for name in ("steps", "prompts_per_step", "turns", "max_generate_length", "num_engines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), "
                             f"got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: greedy rollouts give a group nothing to compare")


class RLTrainer:
    """Owns the engine, the trainer's model and optimizer, and the step described in the module
    docstring."""

    def __init__(self, config: TrainerConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.device = torch.device(config.trainer_device)
        options = {"seed": config.seed, **config.engine_options}
        # The backend is chosen by name; the trainer talks to its engines through the client only.
        self.engines = [skyrl_backends.create_engine(config.backend, model=config.model, **options)
                        for _ in range(config.num_engines)]
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.client = InferenceEngineClient(self.engines, tokenizer=self.tokenizer)
        self.generator: Generates = self.client
        self.chat = ChatTokens(self.tokenizer)
        self.policy = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).to(self.device)
        self.policy.train()
        self.weight_sync = WeightSync(
            choose_strategy(config.weight_sync, [e.capabilities.weight_sync_strategies for e in self.engines],
                            self.device), self.device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.learning_rate)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.sampling = SamplingParams(max_generate_length=config.max_generate_length,
                                       temperature=config.temperature, logprobs=0,
                                       stop_token_ids=(self.chat.end_of_turn_id,))
        self.sleep_level = self._choose_sleep_level()
        self.colocate = config.colocate and self.sleep_level is not None
        self.last_rollout: RolloutBatch | None = None
        self.policy_version = 0  # updates applied to the trainer's policy (= versions pushed to the engines)
        self.compute_dtype: torch.dtype | None = None  # of the forward; from the engine at the first step
        self._next_rollout: asyncio.Future[RolloutBatch] | None = None

    @property
    def engine(self) -> Any:
        """The first engine (they are identical; for capabilities and inspection)."""
        return self.engines[0]

    def _choose_sleep_level(self) -> int | None:
        levels = set.intersection(*(set(e.capabilities.sleep_levels) for e in self.engines))
        if not levels:
            return None
        if self.config.sleep_level is None:
            return max(levels)
        if self.config.sleep_level not in levels:
            raise ValueError(f"sleep_level {self.config.sleep_level} is not supported by backend "
                             f"{self.config.backend!r}; it supports {sorted(levels)}")
        return self.config.sleep_level

    @property
    def discards_weights(self) -> bool:
        caps = self.engine.capabilities
        return (self.sleep_level is not None and caps.discards_weights_at_level is not None
                and self.sleep_level >= caps.discards_weights_at_level)

    def make_envs(self) -> list[SayTheDigitEnv]:
        """``prompts_per_step`` tasks, each played ``group_size`` times (consecutive: one group)."""
        envs = []
        for _ in range(self.config.prompts_per_step):
            targets = sample_targets(self.rng, self.config.turns, [int(d) for d in self.config.digits])
            envs.extend(SayTheDigitEnv(targets) for _ in range(self.config.group_size))
        return envs

    async def _generate(self) -> RolloutBatch:
        return await run_agent_loops(self.generator, self.make_envs(), self.chat, self.sampling,
                                     max_turns=self.config.turns)

    async def train_step(self, step: int) -> dict[str, Any]:
        """One step (generate, update, sync), or with ``async_rollouts`` one step of the overlapped
        schedule; returns its metrics."""
        await self.resolve_compute_dtype()
        if self.config.async_rollouts:
            return await self.async_train_step(step)
        started = time.perf_counter()
        metrics: dict[str, Any] = {"step": step}
        timer = _PhaseTimer(metrics)
        client = self.client

        if self.colocate:
            async with timer("wake_kv_cache_s"):
                await client.wake_up(["kv_cache"])
        rollout = await self._generate()
        self.last_rollout = rollout
        metrics.update(rollout_metrics(rollout))
        if self.colocate:
            async with timer("sleep_s"):
                await client.sleep(level=self.sleep_level)

        update_started = time.perf_counter()
        metrics.update(self.update(rollout))
        metrics["update_s"] = time.perf_counter() - update_started

        if self.colocate:
            async with timer("wake_weights_s"):
                await client.wake_up(["weights"])
        async with timer("weight_sync_s"):
            metrics["weight_version"] = await self.weight_sync.push(client, self.policy)
        metrics["step_s"] = time.perf_counter() - started
        return metrics

    async def async_train_step(self, step: int) -> dict[str, Any]:
        """One step of the overlapped schedule (module docstring): take the rollout generated
        meanwhile, start the next, train, and push the new weights while that one runs."""
        started = time.perf_counter()
        metrics: dict[str, Any] = {"step": step}
        if self._next_rollout is None:  # the first step has nothing to overlap with
            self._next_rollout = asyncio.ensure_future(self._generate())
        rollout = await self._next_rollout
        metrics["generation_wait_s"] = time.perf_counter() - started  # training waited this long for it
        self.last_rollout = rollout
        self._next_rollout = asyncio.ensure_future(self._generate()) if step < self.config.steps else None
        metrics.update(rollout_metrics(rollout))
        update_started = time.perf_counter()
        # In a worker thread, so the event loop keeps driving the generation that overlaps it.
        metrics.update(await asyncio.to_thread(self.update, rollout))
        metrics["update_s"] = time.perf_counter() - update_started
        sync_started = time.perf_counter()
        metrics["weight_version"] = await self.weight_sync.push(self.client, self.policy)
        metrics["weight_sync_s"] = time.perf_counter() - sync_started
        metrics["step_s"] = time.perf_counter() - started
        return metrics

    async def resolve_compute_dtype(self) -> None:
        """Settle the dtype of the trainer's forward (asks the engine which dtype it serves);
        ``train_step`` does it first, and :meth:`update` needs it done."""
        if self.compute_dtype is not None:
            return
        if self.config.trainer_compute_dtype == "float32":
            self.compute_dtype = torch.float32
            return
        self.compute_dtype = engine_dtype(await self.engine.weight_specs())

    def _forward_precision(self) -> Any:
        """Autocast to the compute dtype (nothing to do in float32)."""
        if self.compute_dtype is None:
            raise RuntimeError("call resolve_compute_dtype() before update()")
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def update(self, rollout: RolloutBatch) -> dict[str, float]:
        """One GRPO step on the trainer's model (policy version ``policy_version`` becomes the next)."""
        states = rollout.states
        packed = grpo.pack_episodes([s.prompt_ids for s in states], [s.response_ids for s in states],
                                    [s.loss_mask for s in states], [s.rollout_logprobs for s in states],
                                    self.pad_token_id, [s.rollout_versions for s in states]).to(self.device)
        masks = grpo.staleness_masks(packed.versions, packed.loss_mask, self.policy_version, self.config.max_staleness)
        loss_mask = packed.loss_mask - masks.dropped
        returns = torch.tensor([s.total_reward for s in states], dtype=torch.float32)
        advantages = grpo.group_advantages(returns, self.config.group_size).to(self.device)
        with self._forward_precision():
            logprobs, entropy = grpo.token_logprobs(self.policy, packed.input_ids, packed.attention_mask,
                                                    with_entropy=True)
        with torch.no_grad():
            # Tokens the engine sampled with the weights the trainer holds now: the two must agree.
            diff = ((logprobs - packed.rollout_logprobs).abs() * masks.on_policy).max()
            mean_entropy = (entropy * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
            generated = (masks.on_policy + masks.stale + masks.dropped).sum().clamp(min=1.0)
        loss, stats = grpo.policy_loss(logprobs, packed.rollout_logprobs, advantages, loss_mask,
                                       self.config.clip_ratio, entropy, self.config.entropy_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.policy_version += 1
        return {"loss": stats.loss, "grad_norm": float(grad_norm), "clip_fraction": stats.clip_fraction,
                "entropy": float(mean_entropy), "logprob_abs_diff_max": float(diff),
                "stale_token_fraction": float(masks.stale.sum() / generated),
                "dropped_token_fraction": float(masks.dropped.sum() / generated)}

    async def close(self) -> None:
        if self._next_rollout is not None:
            self._next_rollout.cancel()
            await asyncio.gather(self._next_rollout, return_exceptions=True)
        self.weight_sync.close()
        await self.client.teardown()


def engine_dtype(specs: dict[str, Any]) -> torch.dtype:
    """The dtype most of an engine's weights are served in (by element count), from its
    ``weight_specs``."""
    counts: dict[str, int] = {}
    for spec in specs.values():
        counts[spec.dtype] = counts.get(spec.dtype, 0) + math.prod(spec.shape)
    return getattr(torch, max(counts, key=counts.get)) if counts else torch.float32


def rollout_metrics(rollout: RolloutBatch) -> dict[str, Any]:
    states = rollout.states
    turns = [t for s in states for t in s.turns]
    exact = [bool(t.info.get("exact")) for t in turns]
    returns = [s.total_reward for s in states]
    per_turn = {}
    for k in range(max(len(s.turns) for s in states)):
        kth = [bool(s.turns[k].info.get("exact")) for s in states if len(s.turns) > k]
        per_turn[f"exact_rate_turn{k + 1}"] = sum(kth) / len(kth)
    return {
        "reward_mean": sum(returns) / len(returns),
        "exact_rate": sum(exact) / len(exact),
        **per_turn,
        "response_tokens_mean": sum(t.num_generated for t in turns) / len(turns),
        "truncated_rate": sum(t.added_eos for t in turns) / len(turns),
        "generation_tokens": rollout.generated_tokens,
        "generation_s": rollout.generation_s,
        "generation_tokens_per_s": rollout.tokens_per_s,
    }


class _PhaseTimer:
    """``async with timer("name_s"): ...`` records the block's wall time into the metrics."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def __call__(self, key: str) -> _Phase:
        return _Phase(self.metrics, key)


class _Phase:
    def __init__(self, metrics: dict[str, Any], key: str) -> None:
        self.metrics, self.key = metrics, key

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()

    async def __aexit__(self, *exc: object) -> None:
        self.metrics[self.key] = time.perf_counter() - self.started


async def train(config: TrainerConfig, progress: bool = True,
                on_step: Callable[[RLTrainer, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``config.steps`` steps; write metrics.csv, reward_curve.png and summary.json into
    ``config.out_dir``; return the summary."""
    from tqdm.auto import tqdm

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall_started = time.perf_counter()
    trainer = RLTrainer(config)
    csv = MetricsCSV(out / "metrics.csv")
    loop_started = time.perf_counter()
    try:
        mode = "async" if config.async_rollouts else "sync"
        bar = tqdm(range(1, config.steps + 1), desc=f"RL on {config.backend} ({mode})", unit="step",
                   disable=not progress)
        for step in bar:
            metrics = await trainer.train_step(step)
            csv.write(metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", exact=f"{metrics['exact_rate']:.2f}",
                            tok_s=f"{metrics['generation_tokens_per_s']:.0f}")
            if on_step is not None:
                on_step(trainer, metrics)
        bar.close()
        loop_s = time.perf_counter() - loop_started
    finally:
        csv.close()
        await trainer.close()
    summary = summarize(csv.rows, fixed_answer_reward=1.0 / len(config.digits))
    summary.update(backend=config.backend, seed=config.seed, sleep_level=trainer.sleep_level,
                   trainer_compute_dtype=str(trainer.compute_dtype).removeprefix("torch."),
                   colocate=trainer.colocate, weight_sync=trainer.weight_sync.strategy, wall_s=time.perf_counter() - wall_started,
                   schedule="async" if config.async_rollouts else "sync",
                   steps_per_s=len(csv.rows) / loop_s,
                   config={k: v for k, v in dataclasses.asdict(config).items()})
    plot_reward_curve(csv.rows, out / "reward_curve.png",
                      title=f"Say the digit: GRPO on {Path(config.model).name} "
                            f"({config.backend} backend, seed {config.seed})")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
