"""One mutation of scripts/mutate.py (see scripts/mutations.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    why: str
    tests: tuple[str, ...] = ()
