"""Build the tiny test model offline and deterministically.

Tests, benchmarks on CPU and the demo need a real model without downloading one. This builds, from
nothing but a built-in corpus and a seed:

* a byte-level BPE tokenizer (vocab 512) trained with ``tokenizers``, saved as a
  ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a chat template;
* a randomly initialised Qwen2 (hidden 128, 2 layers, head size 32, which vLLM's CPU attention
  needs) saved with ``save_pretrained`` as safetensors;
* a small LoRA adapter for it (peft), under ``lora/``.

``tied=True`` builds the same model with its output layer tied to its input embedding
(``tie_word_embeddings``, as Qwen2.5 up to 3B and Llama 3.2 1B/3B have), without the adapter: the
conformance suite's tied-embeddings group runs on it.

The same seed gives the same bytes. Weights are drawn with a larger spread than a trained model's
so that greedy decoding does not collapse into one repeated token.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CORPUS = """\
The quick brown fox jumps over the lazy dog. A policy samples tokens; a reward tells it how well it did.
Reinforcement learning for language models alternates between generating rollouts and updating weights.
The inference engine sleeps while the trainer runs, wakes up, receives new weights and generates again.
Count with me: one two three four five six seven eight nine ten. Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12.
Hello world! How are you today? I am fine, thank you. What is two plus two? Two plus two is four.
Alice and Bob exchange messages over a channel; Eve listens. Keys, values, queries and attention heads.
Prefix caching reuses the computation of shared prompt prefixes across the turns of a conversation.
Stop strings end generation; stop token ids end generation; the maximum length ends generation too.
"""
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 512
DEFAULT_SEED = 1234
LORA_DIR = "lora"


def build_tokenizer(out_dir: Path) -> None:
    # A deterministic BPE merge order. Read when the tokenizers library first starts its thread pool,
    # so before any parallel use in the process.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_model(out_dir: Path, seed: int, vocab_size: int, tied: bool = False) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True)


def build_lora(model_dir: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed + 1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # random A and B, so the adapter visibly changes output
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(model_dir / LORA_DIR)
    # peft records the base model's path; an absolute local path would differ between machines.
    adapter_config = model_dir / LORA_DIR / "adapter_config.json"
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = None
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])  # peft writes a set, in hash order
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (model_dir / LORA_DIR / "README.md").unlink(missing_ok=True)  # a model card naming local paths


def model_vocab_size(folder: Path) -> int:
    """The vocabulary of a model for the tokenizer built into ``folder``: every id the tokenizer
    can produce, special tokens included, and at least ``VOCAB_SIZE``.

    Read as the class :func:`build_tokenizer` saved, whatever else the folder holds: ``AutoTokenizer``
    also reads a ``config.json`` there, and a model built into the same folder before (a GPU machine's
    second ``rl-model`` step) made it load Qwen2's tokenizer class, one id longer (513 instead of 512),
    so the same script gave models of two vocabularies."""
    from transformers import PreTrainedTokenizerFast

    return max(len(PreTrainedTokenizerFast.from_pretrained(folder)), VOCAB_SIZE)


def build_tiny_model(out_dir: str | os.PathLike[str], seed: int = DEFAULT_SEED, with_lora: bool = True,
                     tied: bool = False) -> Path:
    """Build the tiny model into ``out_dir`` (created; reused when already complete)."""
    out = Path(out_dir)
    marker = out / ".skyrl_tiny_model"
    built = f"{seed}{' tied' if tied else ''}"
    if marker.exists() and marker.read_text().strip() == built:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out, seed, model_vocab_size(out), tied=tied)
    if with_lora and not tied:
        build_lora(out, seed)
    marker.write_text(f"{built}\n")
    return out


TEST_MODEL_ENV = "SKYRL_TEST_MODEL"


def resolve_test_model(build_into: str | os.PathLike[str] | None = None) -> str | None:
    """The tiny model tests run on: the folder ``SKYRL_TEST_MODEL`` names (the Makefile sets it), or,
    when it is unset or holds no model, one built into ``build_into``; None when there is neither
    (callers skip). One rule for every test suite of the repository."""
    path = os.environ.get(TEST_MODEL_ENV)
    if path and Path(path, "config.json").is_file():
        return path
    if build_into is not None:
        return str(build_tiny_model(build_into))
    return None


def fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A hash of every file the builder writes (to check that builds are reproducible)."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    path = build_tiny_model(args.out_dir, args.seed)
    print(f"tiny model in {path} (sha256 {fingerprint(path)[:16]})")


if __name__ == "__main__":
    main()
