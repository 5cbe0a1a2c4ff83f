"""What every engine server started as a child process shares (``skyrl-backends serve``, ``vllm
serve``, SGLang's ``launch_server``): how long it may take to start and to stop, its log's tail, and
the end of its process session."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

# Loading a model and compiling an engine's kernels can take minutes.
DEFAULT_START_TIMEOUT_S = 600.0
# After SIGTERM, how long a server gets to shut down before SIGKILL.
STOP_TIMEOUT_S = 30.0


def stop_child(process: subprocess.Popen, *, whole_session: bool) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM, SIGKILL after
    ``STOP_TIMEOUT_S``, then whatever is left of its session. ``whole_session`` sends the SIGTERM to
    every process of the session (an engine's own server, whose children each handle it); without
    it only ``process`` gets it (``skyrl-backends serve``, which stops its engine in order itself)."""
    if process.poll() is None:
        try:
            if whole_session:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    kill_session_leftovers(process)


def kill_session_leftovers(process: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the session of ``process``, started with ``start_new_session=True``
    and ended: a server's own children (a vLLM engine core and its workers) outlive it when it was
    killed rather than stopped."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
