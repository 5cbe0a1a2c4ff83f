"""The build backend of the repository root, which is a workspace and not a distribution.

`pip install .` at the root would otherwise fail deep inside setuptools ("Multiple top-level packages
discovered"). The repository holds several distributions, and two of the engines conflict, so there
is no one thing `.` could install: every hook stops with the commands that install each part.
"""

from __future__ import annotations

from typing import Any

MESSAGE = """\
This is the root of the skyrl-backends repository: a workspace of several distributions, not one.
Install the parts you need from their folders (engines that conflict go in separate environments):

  pip install ./core ./plugins/transformers_backend       # the core and the reference backend
  pip install ./core './plugins/vllm_backend[gpu]'         # vLLM on a CUDA machine
  pip install ./core './plugins/sglang_backend[gpu]'       # SGLang on a CUDA machine

or from PyPI, as the README's install table shows. To develop here: `make test`, or
`uv sync --extra transformers` (the workspace's environments; see README.md).
"""


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise SystemExit(MESSAGE)


get_requires_for_build_wheel = _refuse
get_requires_for_build_sdist = _refuse
get_requires_for_build_editable = _refuse
prepare_metadata_for_build_wheel = _refuse
prepare_metadata_for_build_editable = _refuse
build_wheel = _refuse
build_sdist = _refuse
build_editable = _refuse
