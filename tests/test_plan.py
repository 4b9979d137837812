"""ConversionPlan: a failing apply leaves the model and its recipes as they were; revert undoes in reverse."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
from torch import nn

from lightning_ste import quantize_activations_
from lightning_ste.config import WeightQuantConfig
from lightning_ste.recipe import recipes_on
from lightning_ste.surgery.plan import ConversionPlan, select_names


class _SwapLayers(ConversionPlan):
    """Replaces ``names`` by Identity one at a time; raises before the ``fail_at``-th replacement."""

    kind: ClassVar[str] = "weights"

    def __init__(self, names: list[str], fail_at: int | None = None) -> None:
        super().__init__()
        self.config = WeightQuantConfig()
        self._names, self.fail_at = names, fail_at

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def lines(self, dry_run: bool = False) -> list[str]:
        return [f"swap {', '.join(self._names)}"]

    def _apply(self, module: nn.Module, undo: Callable[[Callable[[], None]], None]) -> None:
        for k, name in enumerate(self._names):
            if k == self.fail_at:
                raise RuntimeError(f"cannot swap {name}")
            old = getattr(module, name)
            setattr(module, name, nn.Identity())
            undo(lambda name=name, old=old: setattr(module, name, old))


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))


def test_a_failing_apply_undoes_every_change_and_records_no_recipe():
    model = _model()
    children = list(model)
    quantize_activations_(model, bits=2)  # an earlier conversion, which must survive
    earlier = recipes_on(model)
    plan = _SwapLayers(["0", "2"], fail_at=1)
    with pytest.raises(RuntimeError, match="cannot swap 2"):
        plan.apply(model)
    assert model[0] is children[0] and model[2] is children[2]  # the first swap was taken back
    assert recipes_on(model) == earlier and not plan.applied


def test_apply_records_the_recipe_and_revert_restores_in_reverse_order():
    model = _model()
    children = list(model)
    plan = _SwapLayers(["0", "2"])
    assert plan.apply(model) == ["0", "2"]
    assert isinstance(model[0], nn.Identity) and isinstance(model[2], nn.Identity)
    (recipe,) = recipes_on(model)
    assert recipe == {
        "kind": "weights",
        "version": 1,
        "arguments": WeightQuantConfig().to_dict(),
        "sites": ["0", "2"],
    }
    with pytest.raises(RuntimeError, match="already applied"):
        plan.apply(model)
    plan.revert()
    assert list(model) == children and recipes_on(model) == []
    x = torch.randn(3, 2)
    assert torch.equal(model(x), nn.Sequential(*children)(x))


def test_format_says_when_nothing_was_changed():
    plan = _SwapLayers(["0"])
    assert plan.format() == "swap 0"
    assert plan.format(dry_run=True) == "swap 0\ndry_run=True: the model was not changed."


def test_select_names_by_glob():
    names = ["features.0", "features.3", "classifier.1"]
    assert select_names(names, None, None) == (names, [], [])
    assert select_names(names, ["features.*", "head*"], ["*.3"]) == (
        ["features.0"],
        ["features.3", "classifier.1"],
        ["head*"],
    )
