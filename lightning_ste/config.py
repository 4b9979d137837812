"""The settings of a conversion, typed, frozen and validated once: :class:`ActivationQuantConfig`, :class:`WeightQuantConfig`.

Every entry point takes one of these (the callbacks build theirs from their keyword arguments on their first
line). ``config.to_dict()`` is the recipe's ``arguments`` stored in checkpoints; ``from_dict`` reads it back.
A bad value raises ``ValueError`` naming the argument and the values it allows.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from lightning_ste.quantizers import ste as ste_registry

__all__ = [
    "ALPHA_CHOICES",
    "ALPHA_FLOOR",
    "ALPHA_GRADS",
    "BINARY_SCALES",
    "DEFAULT_LAYER_TYPES",
    "ROUNDINGS",
    "TARGET_CHOICES",
    "TERNARY_SCALES",
    "ActivationQuantConfig",
    "WeightQuantConfig",
    "check_bits",
    "check_choice",
    "check_patterns",
    "check_quantized_relu_args",
]

MIN_BITS, MAX_BITS = 1, 8
ALPHA_FLOOR = 1e-3  # the smallest resolution the forward uses (alpha is clamped to it)
ALPHA_CHOICES = ("learned", "fixed", "calibrate")
ALPHA_GRADS = ("ae", "mean", "min", "pact")
ROUNDINGS = ("ceil", "nearest")
TARGET_CHOICES = ("relu", "relu6")
TERNARY_SCALES = ("twn", "bcgd_code")
BINARY_SCALES = ("mean", "median")
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_C = TypeVar("_C", bound="_Config")


# ------------------------------------------------------------------------------------------ validators


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown `{name}` {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate a bit-width: an int in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")
    return value


def check_count(name: str, value: object) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


def check_patterns(patterns: object, name: str) -> tuple[str, ...] | None:
    """Validate ``include``/``exclude``: None, a glob string, or a sequence of glob strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    if isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns):
        return tuple(patterns)
    raise ValueError(f"`{name}` must be None, a glob pattern or a list of glob patterns, got {patterns!r}")


def check_quantized_relu_args(
    bits: object, ste: object, alpha_grad: object, alpha_lr_scale: object, rounding: object
) -> None:
    """Validate the settings of the quantized ReLU; ``ValueError`` naming the argument otherwise."""
    check_bits(bits)
    ste_registry.get(ste)  # type: ignore[arg-type]
    check_choice("alpha_grad", alpha_grad, ALPHA_GRADS)
    check_choice("rounding", rounding, ROUNDINGS)
    if (
        isinstance(alpha_lr_scale, bool)
        or not isinstance(alpha_lr_scale, (int, float))
        or not (math.isfinite(alpha_lr_scale) and alpha_lr_scale >= 0)
    ):
        raise ValueError(f"`alpha_lr_scale` must be a finite number >= 0, got {alpha_lr_scale!r}")


def _check_targets(targets: object) -> tuple[str, ...]:
    if (
        isinstance(targets, str)
        or not isinstance(targets, Sequence)
        or not targets
        or any(t not in TARGET_CHOICES for t in targets)
    ):
        raise ValueError(
            f"`targets` must be a non-empty list of {', '.join(map(repr, TARGET_CHOICES))}, got {targets!r}"
        )
    return tuple(t for t in TARGET_CHOICES if t in targets)


def _check_alpha(alpha: object) -> str | float:
    if isinstance(alpha, str):
        if alpha not in ALPHA_CHOICES:
            raise ValueError(
                f"unknown `alpha` {alpha!r}; allowed: 'learned', 'fixed', 'calibrate' or a number > 0"
            )
        return alpha
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (math.isfinite(alpha) and alpha >= ALPHA_FLOOR)
    ):
        # Below the floor the forward would clamp it: a value that cannot be used as given is refused.
        raise ValueError(
            "`alpha` must be one of 'learned', 'fixed', 'calibrate' or a finite number > 0 (at least the floor "
            f"{ALPHA_FLOOR:g}), got {alpha!r}"
        )
    return float(alpha)


def check_layer_types(layer_types: object) -> tuple[type[nn.Module], ...]:
    """Validate ``layer_types``: an ``nn.Module`` subclass or a non-empty sequence of them."""
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if (
        isinstance(layer_types, (tuple, list))
        and layer_types
        and all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types)
    ):
        return tuple(layer_types)
    raise ValueError(f"`layer_types` must be a non-empty tuple of nn.Module subclasses, got {layer_types!r}")


def type_name(t: type) -> str:
    """The qualified name a recipe stores for a layer class."""
    return f"{t.__module__}.{t.__qualname__}"


def type_from_name(name: str) -> type[nn.Module]:
    module_name, _, qualname = name.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------- configs


class _Config:
    """What both configs share: ``replace``, ``from_dict`` and the choice between a config and keywords."""

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls: type[_C], arguments: Mapping[str, Any]) -> _C:
        """The config of a recipe's ``arguments`` (as written by :meth:`to_dict`); unknown keys are refused."""
        if not isinstance(arguments, Mapping):
            raise ValueError(f"recipe arguments must be a mapping, got {type(arguments).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(arguments) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} argument(s) {unknown}; allowed: {', '.join(sorted(names))}"
            )
        return cls(**arguments)

    @classmethod
    def of(cls: type[_C], config: _C | None = None, **kwargs: Any) -> _C:
        """``config`` as given, or one built from ``kwargs``; both at once is an error."""
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, cls):
            raise ValueError(f"`config` must be a {cls.__name__}, got {type(config).__name__}")
        if kwargs:
            raise ValueError(f"pass either `config` or keyword arguments, not both (got {sorted(kwargs)})")
        return config


@dataclass(frozen=True)
class ActivationQuantConfig(_Config):
    """How ReLUs become b-bit staircase ReLUs trained with an STE (YLZ19, BCGD19, LYX21).

    Args:
        bits: bits of the activations, 1..8 (``L = 2**bits - 1`` levels above zero).
        ste: the straight-through estimator's name (``lightning_ste.ste.available()``).
        alpha: ``"learned"`` (init ``half_gaussian_resolution(bits)``, trained with the BCGD19 proxy),
            ``"fixed"`` (that value, frozen), ``"calibrate"`` (``max|x| / L`` over the first
            ``calibration_batches`` training batches, then frozen) or a number > 0 (frozen).
        alpha_grad: the proxy of d sigma / d alpha: ``"ae"``, ``"mean"``, ``"min"`` or ``"pact"`` (BCGD19).
        alpha_lr_scale: r in ``d loss / d alpha = clamp(r * sum(...), -1, 1)``.
        rounding: ``"ceil"`` (the papers' code) or ``"nearest"``.
        include, exclude: glob patterns over the site names printed in the plan.
        calibration_batches: training batches used by ``alpha="calibrate"``.
        targets: the activations converted: ``("relu",)``, or ``("relu", "relu6")`` to also turn ReLU6 into
            the staircase capped at 6 (``alpha = 6 / L`` fixed, the clipped ReLU with a fixed top).
    """

    bits: int = 4
    ste: str = "clipped_relu"
    alpha: str | float = "learned"
    alpha_grad: str = "mean"
    alpha_lr_scale: float = 0.01
    rounding: str = "ceil"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    calibration_batches: int = 1
    targets: Sequence[str] = ("relu",)

    def __post_init__(self) -> None:
        check_quantized_relu_args(self.bits, self.ste, self.alpha_grad, self.alpha_lr_scale, self.rounding)
        targets = _check_targets(self.targets)
        alpha = _check_alpha(self.alpha)
        check_count("calibration_batches", self.calibration_batches)
        normal = {
            "alpha": alpha,
            "alpha_lr_scale": float(self.alpha_lr_scale),
            "include": check_patterns(self.include, "include"),
            "exclude": check_patterns(self.exclude, "exclude"),
            "targets": targets,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The recipe's ``arguments``: plain JSON-able values.

        ``targets`` is written only when it is not the default ``("relu",)``, so recipes and callback state
        keys made before it existed stay valid.
        """
        out: dict[str, Any] = {
            "bits": self.bits,
            "ste": self.ste,
            "alpha": self.alpha,
            "alpha_grad": self.alpha_grad,
            "alpha_lr_scale": self.alpha_lr_scale,
            "rounding": self.rounding,
            "include": None if self.include is None else list(self.include),
            "exclude": None if self.exclude is None else list(self.exclude),
            "calibration_batches": self.calibration_batches,
        }
        if tuple(self.targets) != ("relu",):
            out["targets"] = list(self.targets)
        return out


@dataclass(frozen=True)
class WeightQuantConfig(_Config):
    """How Linear / Conv weights become binary, ternary or b-bit q(W) trained with BCGD (BCGD19).

    Args:
        bits: weight bits, 1..8 (1 binary ``mean|W| sign(W)``, 2 ternary TWN, above symmetric b-bit).
        include, exclude: glob patterns over module names choosing the layers.
        keep_first_last: keep the first and last weight layer *in execution order* in float (BCGD19's 65.46%
            setting); found with a probe forward.
        per_channel: one scale per output channel instead of one per tensor.
        ternary_scale: ``"twn"`` or ``"bcgd_code"`` (the ternary scale over kept or all entries).
        binary_scale: ``"mean"`` or ``"median"``.
        layer_types: the layer classes considered (classes, or their qualified names as a recipe stores them).
    """

    bits: int = 1
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    keep_first_last: bool = False
    per_channel: bool = False
    ternary_scale: str = "twn"
    binary_scale: str = "mean"
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_bool("per_channel", self.per_channel)
        check_choice("ternary_scale", self.ternary_scale, TERNARY_SCALES)
        check_choice("binary_scale", self.binary_scale, BINARY_SCALES)
        check_bool("keep_first_last", self.keep_first_last)
        types = self.layer_types
        if isinstance(types, (list, tuple)) and types and all(isinstance(t, str) for t in types):
            types = tuple(type_from_name(t) for t in types)
        normal = {
            "include": check_patterns(self.include, "include"),
            "exclude": check_patterns(self.exclude, "exclude"),
            "layer_types": check_layer_types(types),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @property
    def quantizer_arguments(self) -> dict[str, Any]:
        """What a :class:`~lightning_ste.WeightQuantizer` takes."""
        return {
            "bits": self.bits,
            "per_channel": self.per_channel,
            "ternary_scale": self.ternary_scale,
            "binary_scale": self.binary_scale,
        }

    def to_dict(self) -> dict[str, Any]:
        """The recipe's ``arguments``: plain JSON-able values, layer classes by qualified name."""
        return {
            "bits": self.bits,
            "include": None if self.include is None else list(self.include),
            "exclude": None if self.exclude is None else list(self.exclude),
            "keep_first_last": self.keep_first_last,
            "per_channel": self.per_channel,
            "ternary_scale": self.ternary_scale,
            "binary_scale": self.binary_scale,
            "layer_types": [type_name(t) for t in self.layer_types],
        }
