"""Test-only: let SGLang's CPU path start on a machine without a CUDA driver.

PyPI has no CPU build of sgl-kernel; its CUDA build's compiled ops link against libcuda and fail to
load, which takes ``import sgl_kernel`` (and so SGLang) down even though the CPU path with
``attention_backend="torch_native"`` never calls them. This hook, active only where this folder is on
PYTHONPATH (the CPU smoke-test target sets it, and SGLang's spawned scheduler processes inherit it),
replaces the op loader with an empty module. It changes nothing else and is never installed.
"""

import importlib.abc
import importlib.machinery
import sys
import types

_TARGET = "sgl_kernel.load_utils"


class _NoCudaOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None:
            return None
        self._real_loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self._real_loader.exec_module(module)
        module._load_architecture_specific_ops = lambda: types.ModuleType("common_ops")
        module._preload_cuda_library = lambda: None


if not any(isinstance(f, _NoCudaOps) for f in sys.meta_path):
    import importlib.util  # noqa: F401  (find_spec above)

    sys.meta_path.insert(0, _NoCudaOps())
