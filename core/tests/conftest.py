import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def double_backend():
    """Register the arithmetic test double as backend 'double' for one test."""
    from doubles import DoublePlugin

    import skyrl_backends as sb

    plugin = DoublePlugin()
    sb.register_backend(plugin, "double")
    yield plugin
    sb.unregister_backend("double")
