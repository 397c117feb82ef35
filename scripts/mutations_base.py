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
    # The CPU variants whose code holds the mutated text (empty: every one). mutate.py skips the
    # mutation, and says so, when it builds another variant: the mutant would not be compiled.
    variants: tuple[str, ...] = ()
