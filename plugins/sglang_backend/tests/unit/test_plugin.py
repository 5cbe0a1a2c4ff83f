"""The backend hooks: discovery without SGLang, capabilities, translation through the hook."""

import subprocess
import sys
import tomllib
from pathlib import Path

from skyrl_backend_sglang import plugin
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.registration import backend_manager
from skyrl_backends.sampling import SamplingParams

PACKAGE = Path(__file__).resolve().parents[2]


def test_import_does_not_import_sglang_or_torch():
    code = ("import sys, skyrl_backend_sglang.plugin as p; p.skyrl_backends_capabilities(None); "
            "p.skyrl_backends_translate_sampling_params(p.SamplingParams(stop=['x'], seed=1), None); "
            "print(sorted(m for m in ('sglang', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_entry_point_and_versions():
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "skyrl-backend-sglang"
    assert meta["project"]["entry-points"]["skyrl_backends"] == {"sglang": "skyrl_backend_sglang.plugin"}
    info = plugin.skyrl_backends_backend_info()
    assert (info.name, info.engine, info.engine_import) == ("sglang", "sglang", "sglang")
    assert info.supported_versions == ">=0.5.17,<0.6"


def test_hooks_validate_as_a_plugin():
    manager = backend_manager(plugin, "sglang")
    translated = manager.hook.skyrl_backends_translate_sampling_params(
        params=SamplingParams(max_generate_length=5, logprobs=1), config=None).to_dict()
    assert translated["sampling_params"]["max_new_tokens"] == 5 and translated["top_logprobs_num"] == 1


def test_gpu_declares_everything_and_sleep_discards_weights():
    caps = plugin.skyrl_backends_capabilities(GeneratorConfig(model="/m"))
    assert caps.sleep_levels == (1, 2) and caps.discards_weights_at_level == 1 and caps.sleep_tags
    assert caps.lora and caps.stop_strings and caps.min_new_tokens and caps.seeded_sampling and caps.native_pause
    assert caps.weight_sync_strategies == ("tensors", "shared_memory", "cuda_ipc", "broadcast")


def test_cpu_declares_sleep_and_lora_absent():
    caps = plugin.skyrl_backends_capabilities(GeneratorConfig(model="/m", device="cpu"))
    assert not caps.sleep and not caps.lora and caps.discards_weights_at_level is None
    assert caps.stop_strings and caps.min_new_tokens and caps.seeded_sampling and caps.abort
    assert caps.weight_sync_strategies == ("tensors", "shared_memory", "broadcast")
