"""Run fuzz targets for N cases each; report cases and failures per target (with the minimal example)."""

from __future__ import annotations

import time
import traceback

from hypothesis import HealthCheck, given, settings

from minicpm.errors import UserError
from tests.fuzz import Target


def run_target(target: Target, cases: int) -> str | None:
    """None when every case returned or raised UserError; else the failure with its minimal example."""
    seen = []

    @settings(max_examples=cases, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def check(value):
        seen.append(1)
        try:
            target.call(value)
        except UserError as e:
            assert "\n" not in str(e).strip(), f"UserError over several lines: {e!r}"

    try:
        check()
    except Exception as e:  # noqa: BLE001 (the report is the point)
        notes = "\n".join(getattr(e, "__notes__", []))
        return f"{type(e).__name__}: {e}\n{notes}\n{''.join(traceback.format_exception(e)[-6:])}"
    return None


def run(targets: list[Target], cases: int) -> int:
    """Run every target; print a table; the number of failing targets."""
    rows, failed = [], 0
    for target in targets:
        t = time.perf_counter()
        failure = run_target(target, cases)
        rows.append((target.name, cases, 0 if failure is None else 1, time.perf_counter() - t))
        if failure:
            failed += 1
            print(f"\nFAIL {target.name}\n{failure}")
    print(f"\n{'target':<26}{'cases':>8}{'failures':>10}{'seconds':>10}")
    for name, n, f, s in rows:
        print(f"{name:<26}{n:>8}{f:>10}{s:>10.1f}")
    return failed
