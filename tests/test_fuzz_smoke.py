"""The fuzz targets of tests/fuzz at 150 cases each (`make fuzz` runs 10 000): every case returns or raises
UserError."""

from __future__ import annotations

import pytest

from tests.fuzz import targets
from tests.fuzz.runner import run_target

SMOKE_CASES = 150


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.name)
def test_fuzz_smoke(target, private_cache):
    failure = run_target(target, SMOKE_CASES)
    assert failure is None, failure
