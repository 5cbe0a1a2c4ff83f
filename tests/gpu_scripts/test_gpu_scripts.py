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


def test_bundle_packs_every_result_but_the_logs_into_one_archive(tmp_path: Path) -> None:
    import tarfile

    (tmp_path / "consistency").mkdir()
    results = {"colocated-081020.json": "{}", "vllm-weight-sync-081706.json": "[1]",
               "consistency/vllm-gpu-bf16.json": "2"}
    for name, text in results.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "call-3.log").write_text("a call's own log")
    result = subprocess.run(["bash", str(SCRIPTS / "run_on_gpu.sh"), "bundle"], cwd=REPO,
                            env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    archives = sorted(tmp_path.glob("results-*.tgz"))
    assert len(archives) == 1
    with tarfile.open(archives[0]) as archive:
        assert {m.name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()} == results
    assert not any((tmp_path / name).exists() for name in results)
    assert (tmp_path / "call-3.log").exists() and "bundled 3 result(s)" in (tmp_path / "log").read_text()
    again = subprocess.run(["bash", str(SCRIPTS / "run_on_gpu.sh"), "bundle"], cwd=REPO,
                           env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True)
    assert again.returncode == 0 and len(list(tmp_path.glob("results-*.tgz"))) == 1  # nothing new: no second


def test_random_model_for_the_rl_step_has_the_tokenizers_vocabulary(tmp_path: Path) -> None:
    """`run_on_gpu.sh rl-model`'s model (one layer here): the demo's digits must be ids the model can
    say, so its vocabulary is the test tokenizer's, its embeddings tied as in the shape."""
    python = REPO / ".venv" / "transformers" / "bin" / "python"  # the script needs transformers
    out = tmp_path / "model"
    summaries = []
    # Twice into the same folder, as a warm GPU machine's second `rl-model` step: the model already
    # there must not change the vocabulary of the next (it did: 512, then 513).
    for _ in range(2):
        done = subprocess.run([str(python), str(SCRIPTS / "make_random_qwen.py"), str(out), "--shape",
                               "qwen2.5-0.5b", "--layers", "1", "--tokenizer-vocab", "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries.append(json.loads(done.stdout.split("MODEL ", 1)[1]))
    summary = summaries[-1]
    assert summaries[0]["vocab"] == summary["vocab"], summaries
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (896, 1, True)
    assert summary == {**summary, "shape": "qwen2.5-0.5b", "layers": 1, "vocab": config["vocab_size"]}
    assert config["vocab_size"] == 512, "the test tokenizer's vocabulary, as the tiny model has it"
    check = subprocess.run([str(python), "-c", "import sys; from transformers import AutoTokenizer; "
                            "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
                            "print(max(i for d in '0123456789' for i in t.encode(d)))", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert int(check.stdout) < config["vocab_size"], "a digit the model cannot say"
