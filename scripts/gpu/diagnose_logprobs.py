"""Where do a backend's sampled log-probabilities depart from the float32 reference, and why?

The conformance test ``test_sampled_logprobs_are_raw`` compares each returned log-probability with a
float32 teacher-forced forward pass. When it fails in half precision, two explanations compete:

* the engine reports *processed* log-probabilities (after temperature or truncation), which would
  show as a systematic error that grows with |1/temperature - 1| and that shrinks when compared with
  the temperature-scaled reference; or
* rounding: the engine computes in bfloat16, and a few positions land further from the float32
  value than the tolerance allows. The same model run through Hugging Face in bfloat16 on the same
  GPU shows how large that rounding is, independently of the engine.

This prints, per sampling setting, the error of the engine against the raw float32 reference,
against the temperature-processed reference, and the bfloat16-versus-float32 error of the Hugging
Face forward pass at the same positions; and writes them as JSON.

    python scripts/gpu/diagnose_logprobs.py --backend vllm --model DIR --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from typing import Any

import torch

SETTINGS: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 1.0},
    {"temperature": 0.5, "top_k": 20},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 1.3},
    {"temperature": 0.5},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engine-options", default="{}", help="JSON of further create_engine options")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="where the Hugging Face half-precision forward runs")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def summarize(errors: list[float]) -> dict[str, float]:
    ordered = sorted(errors)
    return {"n": len(errors), "mean": round(statistics.fmean(errors), 4),
            "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 4), "max": round(ordered[-1], 4)}


def hf_half_logprobs(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``response`` from the half-precision HF model on the GPU."""
    ids = torch.tensor([prompt + response[:-1]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, -1).cpu()


async def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import skyrl_backends as sb
    from skyrl_backends.conformance.oracles import ReferenceModel

    reference = ReferenceModel(args.model)
    half = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    engine = sb.create_engine(args.backend, model=args.model, dtype=args.dtype, enable_lora=True,
                              **json.loads(args.engine_options))
    prompts = reference.prompts(3, seed=32) + reference.prompts(args.prompts - 3, seed=40)
    rows = []
    try:
        for setting in SETTINGS:
            raw, processed, hf_half = [], [], []
            worst: dict[str, Any] = {"error": -1.0}
            for seed in range(args.seeds):
                params = {"max_generate_length": args.tokens, "logprobs": 0, "seed": 1000 + seed, **setting}
                out = await engine.generate(prompts, params)
                for prompt, c in zip(prompts, out, strict=True):
                    ref = reference.teacher_forced_logprobs(prompt, c.token_ids)
                    temperature = setting["temperature"] or 1.0
                    ref_processed = torch.log_softmax(ref / temperature, -1)
                    ref_half = hf_half_logprobs(half, prompt, c.token_ids)
                    for i, (token, got) in enumerate(zip(c.token_ids, c.logprobs or [], strict=True)):
                        error = abs(got - float(ref[i, token]))
                        raw.append(error)
                        processed.append(abs(got - float(ref_processed[i, token])))
                        hf_half.append(abs(float(ref_half[i, token]) - float(ref[i, token])))
                        if error > worst["error"]:
                            worst = {"error": round(error, 4), "engine": round(got, 4),
                                     "reference": round(float(ref[i, token]), 4),
                                     "hf_half": round(float(ref_half[i, token]), 4), "position": i,
                                     "token": token, "prompt": prompt, "seed": 1000 + seed}
            rows.append({"setting": setting, "engine_vs_raw": summarize(raw),
                         "engine_vs_processed": summarize(processed), "hf_half_vs_raw": summarize(hf_half),
                         "worst": worst})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        await engine.teardown()
    return {"backend": args.backend, "engine_version": engine.engine_version(), "dtype": args.dtype,
            "environment": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "SGLANG_"))},
            "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['backend']} {result['engine_version']} ({result['dtype']}): |error| of sampled log-probabilities")
    print(f"{'setting':36}{'vs raw fp32 mean/p95/max':>28}{'vs processed mean':>20}{'HF half vs fp32 p95/max':>26}")
    for row in result["rows"]:
        r, p, h = row["engine_vs_raw"], row["engine_vs_processed"], row["hf_half_vs_raw"]
        print(f"{json.dumps(row['setting']):36}{r['mean']:>10.3f}{r['p95']:>9.3f}{r['max']:>9.3f}"
              f"{p['mean']:>20.3f}{h['p95']:>13.3f}{h['max']:>13.3f}")


def main() -> None:
    args = parse_args()
    result = asyncio.run(diagnose(args))
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
