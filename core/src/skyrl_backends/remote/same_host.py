"""Whether an engine server shares this machine's shared memory (and so its weight-sync shortcuts).

Hostnames and boot ids say too little (containers share a kernel but not always ``/dev/shm``), so
the remote engine asks: it writes a random token into a shared-memory segment of its own and the
server reads the segment by name (``POST /skyrl/v1/host/probe``). Only a server that sees this
process's shared memory reads the token back; only then does the remote engine offer the
``tensors`` and ``shared_memory`` strategies (and ``cuda_ipc``, whose handles are opened on the same
GPUs), which all pass bytes through memory both processes map. Elsewhere weights travel by broadcast.
"""

from __future__ import annotations

import os
import re
import secrets
from multiprocessing import shared_memory

PROBE_PREFIX = "skyrl_probe_"
PROBE_NAME = re.compile(r"^skyrl_probe_[0-9a-f]{32}$")
TOKEN_BYTES = 16


class Probe:
    """A segment holding a random token, unlinked by :meth:`close`."""

    def __init__(self) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.name = PROBE_PREFIX + secrets.token_hex(16)
        self._segment = shared_memory.SharedMemory(name=self.name, create=True, size=TOKEN_BYTES)
        self._segment.buf[:TOKEN_BYTES] = self.token

    def matches(self, content_hex: str | None) -> bool:
        return content_hex is not None and content_hex == self.token.hex()

    def close(self) -> None:
        try:
            self._segment.close()
            self._segment.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_probe(name: str) -> str | None:
    """Server side: the token in probe segment ``name`` as hex, or None when this process cannot see
    it. Only names of the probe's own form are opened, read-only, and never registered with the
    resource tracker (which would unlink the caller's segment when the server exits)."""
    if not isinstance(name, str) or not PROBE_NAME.match(name):
        raise ValueError(f"{name!r} is not a probe segment name ({PROBE_NAME.pattern})")
    try:
        import _posixshmem
    except ImportError:  # pragma: no cover - non-POSIX platforms have no shared-memory strategy
        return None
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except (FileNotFoundError, PermissionError):
        return None
    try:
        data = os.pread(fd, TOKEN_BYTES, 0)
    finally:
        os.close(fd)
    return data.hex() if len(data) == TOKEN_BYTES else None


__all__ = ["PROBE_NAME", "Probe", "read_probe"]
