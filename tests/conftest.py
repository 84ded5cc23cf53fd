import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite tests the pure-PyTorch norm layers whether or not inplace-abn is installed; the tests
# that take the fixture below run with the package.  CSSBENCH_INPLACE_ABN=1 (CI sets it) makes
# those tests fail, not skip, when the package is missing.
REQUIRE_INPLACE_ABN = os.environ.get("CSSBENCH_INPLACE_ABN") == "1"
os.environ["CSSBENCH_INPLACE_ABN"] = "0"


@pytest.fixture
def inplace_abn(monkeypatch):
    """The inplace_abn package, used by make_norm_act (and by run.py subprocesses) in this test."""
    try:
        import inplace_abn as package
    except ImportError as exc:
        if REQUIRE_INPLACE_ABN:
            pytest.fail(f"CSSBENCH_INPLACE_ABN=1 but inplace_abn is not importable ({exc})")
        pytest.skip("inplace-abn is not installed")
    monkeypatch.setenv("CSSBENCH_INPLACE_ABN", "1")
    return package
