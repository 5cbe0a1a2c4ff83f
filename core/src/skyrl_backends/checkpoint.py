"""The tensors a weight update may target, in the trainer's (Hugging Face) naming, read from a
checkpoint folder.

Engines that serve fused parameters (vLLM's and SGLang's ``qkv_proj``, ``gate_up_proj``), repack
them (vLLM on CPU), or run in another process (an engine's own server) cannot list what a trainer
sends from their modules. The names and shapes a trainer sends are those of the checkpoint, so they
are read from the checkpoint's safetensors headers (JSON; no tensor is loaded and no torch import is
needed). The dtype is the one the engine serves: updates are converted to it. Used by the vLLM
backend and by engines behind an unmodified vLLM or SGLang server (:mod:`skyrl_backends.remote.native`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from skyrl_backends.errors import ConfigError
from skyrl_backends.types import TensorSpec

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / f for f in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError("model", f"{model_dir} holds no safetensors checkpoint, which the engine's parameter "
                                   "names and shapes are read from.")
    return files


def read_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


# Tied word embeddings (``tie_word_embeddings``): the output layer's weight is the input embedding,
# which a Hugging Face checkpoint stores once, under the embedding's name.
TIED_EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"


def model_folder_json(model_dir: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """A JSON file of a model folder (``config.json``...), None when the folder has none (or is not
    on this machine)."""
    path = Path(model_dir) / name
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_specs(model_dir: str | os.PathLike[str], served_dtype: str) -> list[TensorSpec]:
    """Every tensor of the checkpoint, with the served dtype. A model with tied embeddings also
    accepts ``lm_head.weight`` (a trainer's state dict holds it), which vLLM maps onto the embedding."""
    specs: dict[str, TensorSpec] = {}
    for path in safetensors_files(model_dir):
        for name, entry in read_header(path).items():
            specs[name] = TensorSpec(name, tuple(int(d) for d in entry["shape"]), served_dtype)
    config = model_folder_json(model_dir, "config.json")
    if config is not None and TIED_HEAD not in specs:
        embed = specs.get(TIED_EMBEDDING)
        if config.get("tie_word_embeddings") and embed is not None:
            specs[TIED_HEAD] = TensorSpec(TIED_HEAD, embed.shape, served_dtype, tied_to=TIED_EMBEDDING)
    return list(specs.values())


SERVED_DTYPES = ("float32", "bfloat16", "float16")


def served_dtype(dtype: str, model_dir: str | os.PathLike[str] | None) -> str:
    """The dtype an engine serves for the configured ``dtype``: itself, or for ``"auto"`` the dtype
    the checkpoint's ``config.json`` declares, float32 when it declares none (as transformers loads
    it). The same on every backend: vLLM's and SGLang's own "auto" would serve a float32 checkpoint
    in half precision, so a trainer in float32 would see other log-probabilities than the engine's.
    "auto" stays "auto" when the model is not a local folder (nothing here reads a hub)."""
    if dtype != "auto" or model_dir is None:
        return dtype
    config = model_folder_json(model_dir, "config.json")
    if config is None:
        return dtype
    declared = declared_dtype(config)
    return declared if declared in SERVED_DTYPES else "float32"


def declared_dtype(config: dict[str, Any]) -> str:
    """The dtype a model's ``config.json`` declares (without a ``torch.`` prefix), float32 when it
    declares none (as transformers loads it)."""
    declared = config.get("dtype") or config.get("torch_dtype")  # transformers 5 writes "dtype"
    return declared.removeprefix("torch.") if isinstance(declared, str) else "float32"


def declared_eos_token_ids(model_dir: str | os.PathLike[str] | None) -> set[int]:
    """The EOS ids a model folder declares in ``config.json`` and ``generation_config.json`` (all of
    them count; a tokenizer may add one more). Empty when the folder is not readable here."""
    ids: set[int] = set()
    if model_dir is None:
        return ids
    for name in ("config.json", "generation_config.json"):
        declared = model_folder_json(model_dir, name)
        if declared is None:
            continue
        value = declared.get("eos_token_id")
        ids.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
    return ids


Described = tuple[tuple[int, ...], str]  # a parameter's shape and dtype name


def module_specs(named_parameters: Iterable[tuple[str, Any]],
                 describe: Callable[[str, Any], Described] | None = None) -> list[TensorSpec]:
    """Specs of a module's parameters listed with their duplicates (``named_parameters(
    remove_duplicate=False)``): a parameter met again under another name (tied embeddings) is listed
    under that name too, ``tied_to`` its first name. ``describe(name, parameter)`` gives the shape and
    dtype name to list (default: the parameter's own, the dtype without the ``torch.`` prefix)."""
    first_name: dict[int, str] = {}
    specs = []
    for name, param in named_parameters:
        first = first_name.setdefault(id(param), name)
        shape, dtype = (describe(name, param) if describe is not None
                        else (tuple(param.shape), str(param.dtype).removeprefix("torch.")))
        specs.append(TensorSpec(name, shape, dtype, tied_to=None if first == name else first))
    return specs
