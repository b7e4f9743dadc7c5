"""`python -m tests.fuzz` (`make fuzz`): every target at FUZZ_CASES cases (default 10 000)."""

from __future__ import annotations

import os
import sys
import tempfile

from tests.fuzz import targets
from tests.fuzz.runner import run

if __name__ == "__main__":
    os.environ.setdefault("MINICPM_CACHE", tempfile.mkdtemp(prefix="minicpm-fuzz-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    cases = int(os.environ.get("FUZZ_CASES", "10000"))
    only = sys.argv[1:]
    chosen = [t for t in targets() if not only or t.name in only]
    sys.exit(1 if run(chosen, cases) else 0)
