"""The helpers that run the GPU proofs on the lent GPU machine (scripts/gpu/), checked on the CPU:
they must work there on the first try, since every call on that machine costs scarce device time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_dist_info_makes_a_source_folder_plugin_discoverable(tmp_path: Path) -> None:
    write_dist_info = _load("write_dist_info")
    folder = write_dist_info.write_dist_info(REPO / "plugins" / "vllm_backend", tmp_path)
    assert folder.name == "skyrl_backend_vllm-0.1.0.dist-info"
    probe = (
        "import json; from importlib import metadata; from skyrl_backends.discovery import discover_backends; "
        "eps = {e.name: e.value for e in metadata.entry_points(group='skyrl_backends')}; "
        "b = discover_backends()['vllm']; "
        "print(json.dumps([eps.get('vllm'), metadata.version('skyrl-backend-vllm'), b.distribution]))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO / 'plugins' / 'vllm_backend' / 'src'}"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "skyrl_backend_vllm.plugin", "0.1.0", "skyrl-backend-vllm"]


def test_core_dist_info_carries_the_console_script(tmp_path: Path) -> None:
    folder = _load("write_dist_info").write_dist_info(REPO / "core", tmp_path)
    assert "skyrl-backends = skyrl_backends.cli:main" in (folder / "entry_points.txt").read_text()
    assert "Name: skyrl-backends\n" in (folder / "METADATA").read_text()


def test_engine_defaults_yield_to_the_callers_options() -> None:
    merged = _load("with_engine_defaults").merged_options(
        {"dtype": "bfloat16", "engine_init_kwargs": {"attention_backend": "triton", "disable_cuda_graph": True}},
        {"dtype": "float32", "engine_init_kwargs": {"disable_cuda_graph": False}, "gpu_memory_utilization": 0.3})
    assert merged == {"dtype": "float32", "gpu_memory_utilization": 0.3,
                      "engine_init_kwargs": {"attention_backend": "triton", "disable_cuda_graph": False}}


def test_engine_defaults_reach_the_backend_of_that_name_only() -> None:
    seen = []
    create = _load("with_engine_defaults").with_defaults(
        lambda backend, model, **options: seen.append((backend, model, options)),
        {"sglang": {"engine_init_kwargs": {"attention_backend": "triton"}}})
    create("sglang", "/m", dtype="float32")
    create("vllm", model="/m")
    assert seen == [("sglang", "/m", {"dtype": "float32", "engine_init_kwargs": {"attention_backend": "triton"}}),
                    ("vllm", "/m", {})]


def test_run_script_is_valid_bash_and_rejects_an_unknown_step(tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "run_on_gpu.sh")], check=True)
    result = subprocess.run(["bash", str(SCRIPTS / "run_on_gpu.sh"), "no-such-step"], cwd=REPO,
                            env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown step no-such-step" in (tmp_path / "log").read_text()
