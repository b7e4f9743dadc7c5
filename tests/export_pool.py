"""The tests' export pool: export commands (and the `quant.awq` directories some of them export) run once per
session in their own processes, two at a time, beside the in-process tests. Its own module, not conftest: pytest
imports conftest.py under another name than the tests' `tests.conftest`, and `Quantized` must be one class for both."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Quantized:
    """A `python -m quant.awq --model MODEL *ARGS` directory, built once per session on the export pool: pass it
    as the model of an export command (also in `EXPORTS_AHEAD`, before it exists) or get it with
    `exports.quantized(q)`."""

    model: str
    args: tuple[str, ...] = ()


class Exports:
    """Export directories shared by every test module: `exports(fmt, model, *args)` runs `python -m export.<fmt>
    --model model --out DIR *args` once per distinct command in the session (its own process, two at a time) and
    returns DIR; `exports.start(...)` begins one in the background. A `Quantized` model is quantised first, on the
    same pool."""

    def __init__(self, root: Path, tiny_path):
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        self.root, self.tiny_path, self.futures, self.runs, self.awq = root, tiny_path, {}, {}, {}
        self.pool = ThreadPoolExecutor(max_workers=2)

    def quantize(self, q: Quantized):
        """Start building `q` (once) -> (its directory, the future of the build)."""
        if q not in self.awq:
            self.tiny_path(q.model)
            out = self.root / f"awq-{len(self.awq)}-{q.model}"
            self.awq[q] = (out, self.pool.submit(self._quantize, q, out))
        return self.awq[q]

    def quantized(self, q: Quantized) -> Path:
        """The directory of `q` once built. Builds are never run out of order: each one is queued before any export
        of its directory, so a worker waiting on it never waits on a queued job."""
        out, future = self.quantize(q)
        future.result()
        return out

    def _key(self, fmt: str, model, args) -> tuple:
        return (fmt, str(self.quantize(model)[0] if isinstance(model, Quantized) else model), *map(str, args))

    def start(self, fmt: str, model, *args: str):
        key = self._key(fmt, model, args)
        if key not in self.futures:
            if str(model).startswith("tiny-"):
                self.tiny_path(str(model))  # built here, before two export processes race for it
            out = self.root / f"{fmt}-{len(self.futures)}-{Path(key[1]).name}"
            build = self.quantize(model)[1] if isinstance(model, Quantized) else None
            self.runs[key] = (list(key), out, build)
            self.futures[key] = self.pool.submit(self._run, *self.runs[key])
        return self.futures[key]

    def __call__(self, fmt: str, model, *args: str) -> Path:
        future = self.start(fmt, model, *args)
        if future.cancel():  # still queued behind the exports ahead of it: the test would idle, so run it now
            from concurrent.futures import Future  # noqa: PLC0415

            key, future = self._key(fmt, model, args), Future()
            try:
                future.set_result(self._run(*self.runs[key]))
            except BaseException as e:  # noqa: BLE001 (kept for every test that asks for this export)
                future.set_exception(e)
            self.futures[key] = future
        return future.result()

    @staticmethod
    def _run(key: list[str], out: Path, build=None) -> Path:
        if build is not None:
            build.result()  # the quantised directory this command exports
        fmt, model, *args = key
        stdout = _python_m(f"export.{fmt}", "--model", model, "--out", str(out), *args)
        (out / "summary.txt").write_text(stdout)  # the summary table; not in the manifest, ignored by runtimes
        return out

    @staticmethod
    def _quantize(q: Quantized, out: Path) -> Path:
        # one thread: AWQ's many small products run fastest so here, and the other pool worker has the other core
        _python_m("quant.awq", "--model", q.model, "--out", str(out), *q.args, threads=1)
        return out


def _python_m(*args: str, threads: int | None = None) -> str:
    """`python -m *args` from the repository root -> its stdout; a failure is an assertion with its stderr's tail."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, f"python -m {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    return r.stdout
