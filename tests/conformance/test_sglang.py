"""The sglang backend against the conformance suite, in its own environment:

    make conformance-sglang-cpu      # SGLang 0.5.23 on the CPU (.venv/sglang, test-only import hook)
    scripts/gpu/run_on_gpu.sh conformance:sglang    # SGLang 0.5.17 on the GPU machine: the authority

On a machine without CUDA the engine runs on SGLang's CPU path, where sleep and LoRA are declared
absent (they crash there); on a GPU every capability is declared. float32 keeps the tiny model's
log-probabilities comparable with the float32 reference (SGLang's "auto" would pick float16).

Known gaps go in `expected_failures` with a reason; a standard test is never deleted.
"""

import importlib.util

from skyrl_backends.conformance import BackendConformanceSuite


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


class TestSGLangConformance(BackendConformanceSuite):
    backend = "sglang"
    engine_options: dict = ({"dtype": "float32", "max_model_len": 512} if _cuda()
                            else {"device": "cpu", "dtype": "float32", "max_model_len": 512})
    expected_failures: dict[str, str] = {}
