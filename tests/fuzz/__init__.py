"""Property-based fuzzing of every input the toolkit reads (`make fuzz`; a 300-case smoke runs in `make test`).

A target is a hypothesis strategy plus the call that reads what it draws. A case passes when the call returns or
raises the project's own `UserError` (one line for the user); any other exception fails the target, and the run
prints hypothesis's minimal example. One module per input kind; `targets()` collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy]  # built lazily: some need a tiny export on disk first
    call: Callable[[object], object]


def targets() -> list[Target]:
    from tests.fuzz import checkpoints, images, manifests, prompts, videos  # noqa: PLC0415

    return [*images.TARGETS, *manifests.TARGETS, *checkpoints.TARGETS, *prompts.TARGETS, *videos.TARGETS]
