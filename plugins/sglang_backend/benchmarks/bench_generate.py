"""Generation throughput through the sglang plugin against ``sglang.Engine`` called directly.

One engine is started with ``skyrl_backends.create_engine("sglang", ...)``. The baseline calls the
``sglang.Engine`` inside it directly (``async_generate`` with the whole batch of token ids, the way
SGLang is cheapest to drive), on the event loop that engine is bound to, so both sides share model,
server arguments, memory and warm-up and only the plugin's own work differs: validation and
translation of canonical parameters, request bookkeeping, the thread hand-off and canonical
completions. Runs alternate (baseline, plugin, baseline, ...) so drifting machine load hits both; the
best of ``--repeats`` runs of each side is compared. One process, one run (not a timed test).
``--decompose`` adds a third side to the turns: ``async_generate`` with the arguments the plugin
builds, which splits a gap into SGLang's cost of those arguments and the plugin's own Python.
The plugin returns each response's text by default, which the baseline (SGLang in token-in/out
mode) never makes; ``--no-text`` asks it for token ids only (``detokenize=False``): like with like.

    # GPU (the issue's setting: 256 prompts x 128 new tokens); SGLang 0.5.17 build of the GPU machine
    python bench_generate.py --model /tmp/models/qwen2.5-1.5b-random --prompts 256 --max-tokens 128 \\
        --dtype bfloat16 --gpu-memory-utilization 0.5 \\
        --engine-kwargs '{"attention_backend": "triton", "sampling_backend": "pytorch", "disable_cuda_graph": true}'
    # CPU (SGLang's CPU path; needs the test-only hook, see plugins/sglang_backend/tests/cpu/hook)
    PYTHONPATH=plugins/sglang_backend/tests/cpu/hook python bench_generate.py --model .cache/tiny-model \\
        --device cpu --dtype float32 --max-model-len 512 --prompts 16 --max-tokens 32

Prints a table of tokens/s and the plugin/native ratio (target >= 0.98) with hardware, SGLang version
and date; ``--output`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import time
from typing import Any

from skyrl_backends.testing.hardware import describe_hardware
from skyrl_backends.testing.provenance import measured_commit

TARGET = 0.98


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--prompts", type=int, default=256, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (random ids)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto (GPU) or cpu")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--engine-kwargs", default="{}", help="JSON for engine_init_kwargs (SGLang ServerArgs)")
    parser.add_argument("--logprobs", type=int, default=None,
                        help="also request log-probabilities (0: chosen token, N: top N) on both sides")
    parser.add_argument("--no-text", action="store_true",
                        help="the plugin returns token ids only (detokenize=False), as the baseline does: SGLang "
                             "runs with skip_tokenizer_init, so async_generate returns no text")
    parser.add_argument("--decompose", action="store_true",
                        help="a third side in the turns: sglang.Engine called with the plugin's own arguments")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args()




async def run_native(engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> int:
    """The baseline: ``sglang.Engine.async_generate`` with the whole batch, on the engine's loop."""
    sgl = engine.impl.engine
    params = {"max_new_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
    extra: dict[str, Any] = {}
    if args.logprobs is not None:
        extra["return_logprob"] = True
        if args.logprobs:
            extra["top_logprobs_num"] = args.logprobs

    async def call() -> int:
        outs = await sgl.async_generate(input_ids=prompts, sampling_params=params, **extra)
        return sum(len(o["output_ids"]) for o in outs)

    return await engine.impl.loop.call(call())


def plugin_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"max_generate_length": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
    if args.logprobs is not None:
        params["logprobs"] = args.logprobs
    if args.no_text:
        params["detokenize"] = False
    return params


async def run_plugin(engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> int:
    out = await engine.generate(prompts, plugin_params(args))
    return sum(len(c.token_ids) for c in out)


async def run_native_as_plugin(engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> int:
    """``--decompose``: ``async_generate`` with the very arguments the plugin passes (its translated
    sampling parameters, request ids, cache salt), and nothing of the plugin's own work around the
    call: against the baseline it is what SGLang does differently with the plugin's arguments, against
    the plugin what the plugin's Python costs."""
    from skyrl_backend_sglang.translation import translate_sampling
    from skyrl_backends.sampling import SamplingParams

    impl = engine.impl
    plan = translate_sampling(SamplingParams.from_dict(plugin_params(args)))
    rids = [f"bench-{os.urandom(8).hex()}" for _ in prompts]

    async def call() -> int:
        outs = await impl.engine.async_generate(**impl._request_kwargs(rids, prompts, plan, None))
        return sum(len(o["output_ids"]) for o in outs)

    return await impl.loop.call(call())


async def timed(coro: Any) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = await coro
    return tokens, time.perf_counter() - start


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import skyrl_backends as sb

    started = time.perf_counter()
    engine = sb.create_engine("sglang", model=args.model, dtype=args.dtype, device=args.device,
                              max_model_len=args.max_model_len, max_num_seqs=max(args.prompts, 1),
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              # Random prompts share no prefix; no cache keeps runs independent.
                              enable_prefix_caching=False, engine_init_kwargs=json.loads(args.engine_kwargs))
    start_s = time.perf_counter() - started
    vocab = engine.impl.tm.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    expected = args.prompts * args.max_tokens
    try:
        await run_native(engine, prompts[:8], args)  # warm-up, both paths
        await run_plugin(engine, prompts[:8], args)
        if args.decompose:
            await run_native_as_plugin(engine, prompts[:8], args)
        native, plugin, as_plugin = [], [], []
        for _ in range(args.repeats):
            tokens, seconds = await timed(run_native(engine, prompts, args))
            assert tokens == expected, f"native generated {tokens} tokens, expected {expected}"
            native.append(tokens / seconds)
            if args.decompose:
                tokens, seconds = await timed(run_native_as_plugin(engine, prompts, args))
                assert tokens == expected, f"native with the plugin's arguments generated {tokens} tokens"
                as_plugin.append(tokens / seconds)
            tokens, seconds = await timed(run_plugin(engine, prompts, args))
            assert tokens == expected, f"plugin generated {tokens} tokens, expected {expected}"
            plugin.append(tokens / seconds)
        version = engine.engine_version()
    finally:
        await engine.teardown()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": measured_commit(),
        "hardware": describe_hardware(), "sglang": version, "model": os.path.basename(os.path.normpath(args.model)),
        "dtype": args.dtype, "device": args.device, "prompts": args.prompts, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "logprobs": args.logprobs, "engine_kwargs": json.loads(args.engine_kwargs),
        "plugin_text": not args.no_text,
        "engine_start_s": round(start_s, 1),
        "native_tok_s": [round(x, 1) for x in native], "plugin_tok_s": [round(x, 1) for x in plugin],
        **({"native_as_plugin_tok_s": [round(x, 1) for x in as_plugin],
            "ratio_as_plugin_paired_median": round(statistics.median(a / n for a, n in zip(as_plugin, native,
                                                                                           strict=True)), 4)}
           if as_plugin else {}),
        "native_best": round(max(native), 1), "plugin_best": round(max(plugin), 1),
        "ratio_best": round(max(plugin) / max(native), 4),
        "ratio_median": round(statistics.median(plugin) / statistics.median(native), 4),
        # Each plugin run against the baseline run just before it: robust to slow drifts in load.
        "ratio_paired_median": round(statistics.median(p / n for p, n in zip(plugin, native, strict=True)), 4),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['hardware']} | SGLang {result['sglang']} | {result['date']}")
    print(f"model {result['model']} ({result['dtype']}), {result['prompts']} prompts x {result['prompt_len']} tokens "
          f"-> {result['max_tokens']} new tokens, logprobs={result['logprobs']}")
    print(f"{'':28}{'best tok/s':>12}   runs")
    print(f"{'sglang.Engine directly':28}{result['native_best']:>12.1f}   {result['native_tok_s']}")
    if "native_as_plugin_tok_s" in result:
        runs = result["native_as_plugin_tok_s"]
        print(f"{'  with the plugin arguments':28}{max(runs):>12.1f}   {runs}  (paired vs directly: "
              f"{result['ratio_as_plugin_paired_median']:.3f})")
    print(f"{'skyrl sglang plugin':28}{result['plugin_best']:>12.1f}   {result['plugin_tok_s']}")
    verdict = "meets" if result["ratio_best"] >= TARGET else "MISSES"
    print(f"plugin / native: {result['ratio_best']:.3f} best, {result['ratio_median']:.3f} median, "
          f"{result['ratio_paired_median']:.3f} median of paired runs ({verdict} the {TARGET} target)")


def main() -> None:
    args = parse_args()
    result = asyncio.run(bench(args))
    print_table(result)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":  # SGLang starts its workers with spawn
    main()
