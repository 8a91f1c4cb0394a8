"""Meta-test, run last: every reduction method is exercised by the suite on every registered backend."""

from pathlib import Path

import pytest

from conftest import EXERCISED
from leanvlm.reduction.schedule import METHODS
from leanvlm.runtime.backends import backend_names
from leanvlm.runtime.backends.base import backend_available


def test_every_method_runs_on_every_backend(request):
    ran = {Path(str(item.fspath)).name for item in request.session.items}
    every = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if ran != every:
        pytest.skip(f"partial run ({len(ran)} of {len(every)} test files): coverage is judged on the whole suite")
    # A backend whose own runtime is not installed here (tensorrt) is judged where it is: its tests are marked.
    missing = [(m, b) for m in METHODS for b in backend_names() if backend_available(b) and (m, b) not in EXERCISED]
    assert not missing, f"no test opens an engine of these (method, backend) pairs: {missing}"
