import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by tests/conftest.py
    pytest.skip("tests/interpret runs only under TRITON_INTERPRET=1", allow_module_level=True)
