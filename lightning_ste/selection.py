"""Select module names with include/exclude glob patterns and print a conversion plan."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

__all__ = ["check_patterns", "select_names"]


def check_patterns(patterns: object, name: str) -> tuple[str, ...] | None:
    """Validate ``include``/``exclude``: None, a glob string, or a sequence of glob strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    if isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns):
        return tuple(patterns)
    raise ValueError(f"`{name}` must be None, a glob pattern or a list of glob patterns, got {patterns!r}")


def select_names(
    names: Iterable[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], list[str], list[str]]:
    """Split ``names`` by glob patterns: ``(selected, left_out, include_patterns_matching_nothing)``.

    A name is selected when it matches some ``include`` pattern (every name when ``include`` is None) and
    no ``exclude`` pattern. Patterns are :mod:`fnmatch` globs over dotted module names.
    """
    names = list(names)
    selected, left_out = [], []
    for n in names:
        inc = include is None or any(fnmatch.fnmatchcase(n, p) for p in include)
        exc = exclude is not None and any(fnmatch.fnmatchcase(n, p) for p in exclude)
        (selected if inc and not exc else left_out).append(n)
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return selected, left_out, unmatched
