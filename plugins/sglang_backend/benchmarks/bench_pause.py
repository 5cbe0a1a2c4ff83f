"""Pausing SGLang under a running request, through the plugin against SGLang's own pause, in turns.

One engine is started with ``skyrl_backends.create_engine("sglang", ...)``; before each timed pause a
request (through the facade) is decoding. Cases, each against SGLang's own call on the same engine
(the tokenizer manager's ``pause_generation`` and ``continue_generation``, on the loop the engine is
bound to):

    abort   the facade's ``pause_generation("abort")`` (every running request ends with its partial
            output; returns once the callers have it) against SGLang's ``pause_generation(mode="abort")``
    keep    the facade's ``pause_generation("keep")`` against SGLang's ``mode="in_place"``

Each timed call is the pause alone; the resume follows untimed. Printed: median milliseconds, the
ratio of medians and the median of paired ratios (SGLang's time over the plugin's: above 1, the
plugin returns sooner). ``--output`` writes every timing as JSON with the commit and hardware.

    # CPU (SGLang's CPU path; needs the test-only hook, see plugins/sglang_backend/tests/cpu/hook)
    PYTHONPATH=plugins/sglang_backend/tests/cpu/hook SGLANG_USE_CPU_ENGINE=1 python bench_pause.py \\
        --model .cache/tiny-model --device cpu --dtype float32 --max-model-len 512
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from skyrl_backends.testing.hardware import describe_hardware
from skyrl_backends.testing.provenance import measured_commit

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "core" / "benchmarks"))
from turns import against_baseline  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--repeats", type=int, default=10, help="timed pauses of each case and side")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--engine-kwargs", default="{}", help="JSON for engine_init_kwargs")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args()


async def decoding(engine: Any, max_tokens: int) -> asyncio.Task:
    """A request through the facade, returned once SGLang has produced a few of its tokens."""
    params = {"max_generate_length": max_tokens, "temperature": 0.0, "ignore_eos": True}
    task = asyncio.create_task(engine.generate([[11, 12, 13, 14]], params))
    while not engine._inflight:
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    return task


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import skyrl_backends as sb
    from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

    engine = sb.create_engine("sglang", model=args.model, device=args.device, dtype=args.dtype,
                              max_model_len=args.max_model_len, engine_init_kwargs=json.loads(args.engine_kwargs))
    impl = engine.impl
    max_tokens = args.max_model_len - 8

    def own(mode: str):
        async def pause() -> None:
            await impl._on_loop(impl.tm.pause_generation(PauseGenerationReqInput(mode=mode)))

        async def resume() -> None:
            await impl._on_loop(impl.tm.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False)))
        return pause, resume

    def ours(mode: str):
        async def pause() -> None:
            await engine.pause_generation(mode)

        async def resume() -> None:
            await engine.resume_generation()
        return pause, resume

    cases = {"abort": (ours("abort"), own("abort")), "keep": (ours("keep"), own("in_place"))}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    try:
        for r in range(args.repeats + 1):  # the first round warms up, untimed
            for name, sides in cases.items():
                for side, (pause, resume) in ((1, sides[1]), (0, sides[0])):  # SGLang's own first
                    task = await decoding(engine, max_tokens)
                    t0 = time.perf_counter()
                    await pause()
                    elapsed = time.perf_counter() - t0
                    if name == "abort":
                        await task
                        await resume()
                    else:  # kept requests finish after the resume
                        await resume()
                        await task
                    if r:
                        times[name][side].append(elapsed)
            print(f"# round {r}/{args.repeats}", file=sys.stderr, flush=True)
    finally:
        await engine.teardown()
    import sglang

    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": measured_commit(), "hardware": describe_hardware(), "sglang": sglang.__version__,
            "model": os.path.basename(os.path.normpath(args.model)), "device": args.device, "repeats": args.repeats,
            "cases": {name: against_baseline(*sides) for name, sides in times.items()}}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(bench(args))
    print(f"\n{result['hardware']} | SGLang {result['sglang']} | {result['date']} | commit {result['commit']}")
    print(f"{'pause':8}{'plugin ms':>11}{'SGLang own ms':>15}{'own/plugin (medians)':>22}{'paired':>9}")
    for name, row in result["cases"].items():
        print(f"{name:8}{row['median_ms']:>11.2f}{row['base_median_ms']:>15.2f}{row['ratio_of_medians']:>22.3f}"
              f"{row['paired']:>9.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
