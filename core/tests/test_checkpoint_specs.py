"""The tensors a weight update may target: a tied parameter's second name is known as such."""

from __future__ import annotations

import json
import struct

import torch
from skyrl_backends.checkpoint import checkpoint_specs, module_specs, served_dtype


def save_file(shapes: dict[str, tuple[int, ...]], path) -> None:
    """A float32 safetensors file of zeros (the format: an 8-byte header length, the JSON header,
    the bytes), written by hand: the core's environment has no safetensors package."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_a_tied_checkpoint_also_accepts_lm_head_tied_to_the_embedding(tmp_path):
    save_file({"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    specs = {s.name: s for s in checkpoint_specs(tmp_path, "bfloat16")}
    assert specs["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert specs["lm_head.weight"].shape == (8, 4)
    assert specs["model.embed_tokens.weight"].tied_to is None and specs["model.norm.weight"].tied_to is None


def test_an_untied_checkpoint_lists_its_own_tensors_only(tmp_path):
    save_file({"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert all(s.tied_to is None for s in checkpoint_specs(tmp_path, "float32"))


def test_module_specs_name_the_first_name_of_a_parameter_met_again():
    module = torch.nn.Module()
    module.embed = torch.nn.Embedding(8, 4)
    module.head = torch.nn.Linear(4, 8, bias=False)
    module.head.weight = module.embed.weight  # tied, as tie_word_embeddings does
    specs = {s.name: s for s in module_specs(module.named_parameters(remove_duplicate=False))}
    assert specs["embed.weight"].tied_to is None
    assert specs["head.weight"].tied_to == "embed.weight"
    assert specs["head.weight"].dtype == "float32" and specs["head.weight"].shape == (8, 4)
    described = module_specs(module.named_parameters(), lambda _, param: ((1,), "bfloat16"))[0]
    assert (described.shape, described.dtype) == ((1,), "bfloat16")


def test_auto_dtype_is_the_checkpoints_on_every_backend(tmp_path):
    """"auto" serves what the checkpoint declares (transformers 5's "dtype" or the older "torch_dtype"),
    float32 when it declares none; a named dtype is kept; a folder-less model stays "auto"."""
    config = tmp_path / "config.json"
    for declared, served in (({"dtype": "float32"}, "float32"), ({"torch_dtype": "bfloat16"}, "bfloat16"),
                             ({"dtype": "float16", "torch_dtype": "float32"}, "float16"), ({}, "float32")):
        config.write_text(json.dumps(declared))
        assert served_dtype("auto", tmp_path) == served, declared
    assert served_dtype("bfloat16", tmp_path) == "bfloat16"
    assert served_dtype("auto", tmp_path / "missing") == "auto"
    assert served_dtype("auto", None) == "auto"


def test_engine_servers_launched_here_serve_auto_as_the_checkpoint_declares(tmp_path):
    from skyrl_backends.remote.native.launch import server_command

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    for protocol in ("vllm", "sglang"):
        command, _ = server_command(protocol, str(tmp_path), 8000, {}, "python")
        assert command[command.index("--dtype") + 1] == "float32", protocol
