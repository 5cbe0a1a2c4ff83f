"""A Qwen2.5-1.5B-shaped model with random weights, for benchmarks on the GPU machine (no downloads).

Shape of Qwen2.5-1.5B: hidden 1536, 28 layers, 12 attention heads, 2 key-value heads, MLP 8960,
vocabulary 151936, tied embeddings, bfloat16: 338 tensors, about 3.09 GB. The tokenizer is the
project's small test tokenizer (engines are given token ids; it only has to load)::

    python scripts/gpu/make_random_qwen.py /tmp/models/qwen2.5-1.5b-random

``--shape qwen2.5-0.5b`` (hidden 896, 24 layers, 14 heads, MLP 4864) for the smaller model.
``--tokenizer-vocab`` sizes the vocabulary to the test tokenizer's (512) instead of the shape's:
for the RL demo's task (benchmark P8), which rewards answering a digit. A random model spreads its
samples over every id of its vocabulary, so with 151936 of them it practically never says a digit
and GRPO sees no reward to learn from; with the tokenizer's 512 it does, as the tiny model does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from skyrl_backends.testing.tiny_model import build_tokenizer, model_vocab_size
from transformers import Qwen2Config, Qwen2ForCausalLM

QWEN25_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")


QWEN25_0P5B = dict(QWEN25_1P5B, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                   intermediate_size=4864)
SHAPES = {"qwen2.5-1.5b": QWEN25_1P5B, "qwen2.5-0.5b": QWEN25_0P5B}


def make_model(out: Path, layers: int | None, device: str, seed: int = 0, shape: str = "qwen2.5-1.5b",
               tokenizer_vocab: bool = False) -> dict:
    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    if tokenizer_vocab:  # as the tiny model sizes its vocabulary
        fields["vocab_size"] = model_vocab_size(out)
    config = Qwen2Config(**fields,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tensors, nbytes = 0, 0
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                tensors += 1
                dims = tensor.get_shape()
                nbytes += 2 * int(torch.tensor(dims).prod()) if dims else 2
    return {"path": str(out), "shape": shape, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "tensors": tensors, "GB": round(nbytes / 1e9, 3),
            "parameters_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's")
    parser.add_argument("--tokenizer-vocab", action="store_true",
                        help="the test tokenizer's vocabulary (512) instead of the shape's (docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    summary = make_model(Path(args.out), args.layers, args.device, shape=args.shape,
                         tokenizer_vocab=args.tokenizer_vocab)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print("MODEL", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
