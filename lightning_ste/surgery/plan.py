"""``ConversionPlan``: plan → format → apply → revert, the one shape of every conversion.

A plan is computed in full before the model is touched (a bad pattern leaves it unchanged), prints what it
will convert and what stays float and why, applies itself with every change recorded in an undo list, and
reverts exactly. Activations (:mod:`.activation_plan`) and weights (:mod:`.weight_params`) both subclass it.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from torch import nn

from lightning_ste import recipe as recipe_store

__all__ = ["ConversionPlan", "Undo", "preview", "qualified", "select_names"]

Undo = Callable[[Callable[[], None]], None]  # takes the function that reverts one change


class ConversionPlan(ABC):
    """What a conversion will do to one model; :meth:`apply` does it, :meth:`revert` undoes it.

    Subclasses set ``kind`` (the recipe kind), hold their ``config`` and fill ``names`` (what gets converted);
    they implement :meth:`_apply` (record each change with ``undo``) and :meth:`lines` (the printed plan).
    """

    kind: ClassVar[str]
    config: Any

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """The names of what gets converted, in order; the recipe's ``sites``."""

    @abstractmethod
    def lines(self, dry_run: bool = False) -> list[str]:
        """The plan as printed: a title line, then what is converted, what stays float and why."""

    @abstractmethod
    def _apply(self, module: nn.Module, undo: Undo) -> None:
        """Convert ``module``; call ``undo(fn)`` after each change with the function that takes it back."""

    def recipe(self) -> dict[str, Any]:
        """The recipe stored on the module and in checkpoints."""
        return recipe_store.make(self.kind, self.config.to_dict(), self.names)

    def format(self, dry_run: bool = False) -> str:
        """The printed plan; a dry run says that the model was not changed."""
        lines = self.lines(dry_run)
        return "\n".join([*lines, "dry_run=True: the model was not changed."] if dry_run else lines)

    def apply(self, module: nn.Module) -> list[str]:
        """Commit the plan to ``module`` and record its recipe; on any error undo what was done and re-raise."""
        if self._undo:
            raise RuntimeError(f"this {type(self).__name__} is already applied")
        try:
            self._apply(module, self._undo.append)
            self._undo.append(recipe_store.record(module, self.recipe()))
        except BaseException:
            self.revert()
            raise
        return self.names

    def revert(self) -> None:
        """Undo :meth:`apply`: the model and its recipe list exactly as they were before it."""
        while self._undo:
            self._undo.pop()()

    @property
    def applied(self) -> bool:
        return bool(self._undo)


def select_names(
    names: Iterable[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], list[str], list[str]]:
    """Split ``names`` by glob patterns: ``(selected, left_out, include_patterns_matching_nothing)``.

    A name is selected when it matches some ``include`` pattern (every name when ``include`` is None) and
    no ``exclude`` pattern. Patterns are :mod:`fnmatch` globs over dotted module names.
    """
    names = list(names)
    selected: list[str] = []
    left_out: list[str] = []
    for n in names:
        inc = include is None or any(fnmatch.fnmatchcase(n, p) for p in include)
        exc = exclude is not None and any(fnmatch.fnmatchcase(n, p) for p in exclude)
        (selected if inc and not exc else left_out).append(n)
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return selected, left_out, unmatched


def qualified(prefix: str, name: str) -> str:
    """The dotted name of ``name`` inside the module named ``prefix`` (either may be empty: the root)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def preview(names: Sequence[str], limit: int = 12) -> str:
    """``names`` joined, cut after ``limit`` with how many more there are."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
