"""Every hook is specified, documented in its spec and in docs/architecture.md, and prefixed."""

from pathlib import Path

import pytest

from skyrl_backends import hookspecs

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


@pytest.mark.parametrize("name", hookspecs.BACKEND_HOOKS + hookspecs.ENGINE_HOOKS)
def test_hook_has_docstring_and_is_in_the_docs(name):
    spec_class = hookspecs.BackendHookSpecs if name in hookspecs.BACKEND_HOOKS else hookspecs.EngineHookSpecs
    doc = getattr(spec_class, name).__doc__
    assert doc and len(doc.split()) >= 5, f"{name} needs a docstring saying when it is called and what it returns"
    assert f"`{name}(" in ARCHITECTURE.read_text() or f"`{name}()`" in ARCHITECTURE.read_text(), \
        f"{name} is missing from docs/architecture.md"


def test_hook_names_carry_the_project_prefix_and_are_unique():
    names = hookspecs.BACKEND_HOOKS + hookspecs.ENGINE_HOOKS
    assert all(n.startswith("skyrl_backends_") for n in names)
    assert len(set(names)) == len(names)
