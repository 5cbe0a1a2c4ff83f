"""LoRA adapters sent as tensors, on vLLM: a PEFT folder per adapter, written engine-side.

vLLM 0.26-0.32 loads adapters from a path only (``LoRARequest.lora_path``; ``load_inplace`` replaces
an adapter under the same id), and a worker reloads an adapter from that path whenever it was
evicted from its cache. So the tensors are received in the workers (any weight-sync strategy, through
``SkyRLWorkerExtension.skyrl_save_adapter``), written as a PEFT folder in the engine's machine, and
loaded with vLLM's own ``add_lora``. The folder stays until the adapter is unloaded, at a stable path
(a symbolic link to the current version), so a reload after eviction reads the adapter's current
tensors, never an older version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFolder:
    """The folders of one adapter name: versions under a temporary root, the current one behind
    :attr:`path`."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="skyrl-lora-")
        self.path = os.path.join(self.root, "current")
        self._versions = 0
        self.current: str | None = None

    def stage(self, lora_config: dict[str, Any]) -> str:
        """A new version's folder holding the config (the workers add the tensors)."""
        self._versions += 1
        folder = os.path.join(self.root, f"v{self._versions}")
        os.mkdir(folder)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(lora_config, f)
        return folder

    def publish(self, folder: str) -> str | None:
        """Make ``folder`` the current version (atomically); returns the version it replaces."""
        if not os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
            raise FileNotFoundError(f"no {WEIGHTS_FILE} was written into {folder}")
        link = os.path.join(self.root, ".next")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(folder, link)
        os.replace(link, self.path)
        previous, self.current = self.current, folder
        return previous

    def keep_only(self, *folders: str | None) -> None:
        """Delete every version but ``folders`` (the current one, and the one a load may still read)."""
        keep = {f for f in folders if f}
        for entry in os.listdir(self.root):
            full = os.path.join(self.root, entry)
            if entry.startswith("v") and full not in keep:
                shutil.rmtree(full, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
