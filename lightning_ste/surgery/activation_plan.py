"""``ActivationPlan``: turn the ReLU call sites of a model into QuantReLUs, alpha * clamp(ceil(x / alpha), 0, L).

The b-bit staircase ReLU trained with a straight-through estimator (YLZ19, BCGD19; docs/math.md §1).
:func:`plan_activations` finds, names and selects the sites (:mod:`.relu_sites`) without touching the model,
so every error is raised there; :meth:`ActivationPlan.apply` then installs one QuantReLU per site and
rewrites the forwards that call them (:mod:`.fx_rewrite`), each change undoable, and records the recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from lightning_ste import recipe as recipe_store
from lightning_ste._compat import module_slots
from lightning_ste.config import ActivationQuantConfig, check_bool
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.resolution import half_gaussian_resolution
from lightning_ste.surgery.fx_rewrite import (
    ABSENT,
    TracedOwner,
    compile_forward,
    disable_fast_path,
    restorer,
    set_forward,
)
from lightning_ste.surgery.plan import ConversionPlan, Undo, preview
from lightning_ste.surgery.relu_sites import (
    TRANSFORMER_LAYERS,
    FoundSites,
    Holder,
    Site,
    find_sites,
    select_sites,
)

__all__ = ["ActivationPlan", "apply_recipe", "plan_activations", "quantize_activations_"]

RELU6_TOP = 6.0


class ActivationPlan(ConversionPlan):
    """What converting the activations will do: sites converted, sites left out, what stays float and why."""

    kind: ClassVar[str] = "activations"
    config: ActivationQuantConfig

    def __init__(
        self,
        config: ActivationQuantConfig,
        sites: list[Site],
        left_out: list[Site],
        not_traced: list[tuple[str, str, str]],  # (module name, class name, reason)
        float_like: list[tuple[str, str]],  # (where, why): ReLU-like, kept float
        locations: dict[str, Holder],
        owners: dict[str, TracedOwner],
    ) -> None:
        super().__init__()
        self.config, self.sites, self.left_out = config, sites, left_out
        self.not_traced, self.float_like = not_traced, float_like
        self._locations, self._owners = locations, owners

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def warning(self) -> str | None:
        """The one warning about modules left in float because they could not be traced, or None."""
        if not self.not_traced:
            return None
        lines = [f"  {name or '<root>'} ({cls}): {reason}" for name, cls, reason in self.not_traced]
        return (
            "lightning_ste: these modules could not be traced with torch.fx, so the functional ReLUs in their"
            " forward stay float (their nn.ReLU children are converted, one quantizer per module):\n"
            + "\n".join(lines)
        )

    def lines(self, dry_run: bool = False) -> list[str]:
        """Each converted site with bits, STE and alpha mode; what was left out and what stays float, and why."""
        a = self.config.to_dict()
        alpha = self._describe_alpha()
        head = "would convert" if dry_run else "converts"
        lines = [f"QuantizeActivations {head} {len(self.sites)} ReLU call site(s) to QuantReLU:"]
        width = max(len(s.name) for s in self.sites + self.left_out)
        for s in self.sites:
            where = {
                "module": s.source,
                "call": f"call {s.call[0]}/{s.call[1]} of shared {s.origin}" if s.call else s.source,
                "function": f"{s.source} in {s.owner or '<root>'}.forward",
                "attribute": f"{s.source}; fused fast path off",
            }[s.kind]
            if s.target == "relu6":
                where += f" (capped at {RELU6_TOP:g}: alpha fixed {RELU6_TOP / (2 ** a['bits'] - 1):.4g})"
            lines.append(
                f"  {s.name:<{width}}  bits={a['bits']} ste={a['ste']} alpha={alpha} "
                f"alpha_grad={a['alpha_grad']} rounding={a['rounding']}  <- {where}"
            )
        if self.left_out:
            lines.append(
                f"Left out by include={a['include']} exclude={a['exclude']} ({len(self.left_out)}): "
                + ", ".join(s.name for s in self.left_out)
            )
        floats = list(self.float_like)
        floats += [
            (f"{n or '<root>'} ({c})", f"Not traced, its functional ReLUs stay float: {r}")
            for n, c, r in self.not_traced
        ]
        if floats:
            lines.append(f"Stays float ({len(floats)}):")
            lines += [f"  {w}: {r}" for w, r in floats]
        else:
            lines.append("Stays float: no other ReLU-like activation found.")
        return lines

    def _describe_alpha(self) -> str:
        c = self.config
        init = half_gaussian_resolution(c.bits)
        if c.alpha == "learned":
            return f"learned (init {init:.4g})"
        if c.alpha == "fixed":
            return f"fixed {init:.4g}"
        if c.alpha == "calibrate":
            n = c.calibration_batches
            return f"calibrate ({n} batch{'es' if n > 1 else ''})"
        return f"fixed {c.alpha:.4g}"

    def _quantizer(self, target: str) -> QuantReLU:
        """The QuantReLU of one site.

        A ReLU6 site gets the staircase capped at 6: ``alpha = 6 / L`` fixed, so the top level ``L * alpha`` is
        6 (the clipped ReLU of YLZ19 with a fixed top), whatever ``alpha`` says.
        """
        c = self.config
        alpha: str | float = c.alpha
        mode = alpha if isinstance(alpha, str) else "fixed"
        if target == "relu6":
            alpha, mode = RELU6_TOP / (2**c.bits - 1), "fixed"
        return QuantReLU(
            bits=c.bits,
            alpha=None if isinstance(alpha, str) else alpha,
            alpha_mode=mode,
            ste=c.ste,
            alpha_grad=c.alpha_grad,
            alpha_lr_scale=c.alpha_lr_scale,
            rounding=c.rounding,
            calibration_batches=c.calibration_batches,
        )

    def _apply(self, module: nn.Module, undo: Undo) -> None:
        """Install the QuantReLUs and rewrite the forwards that call them."""
        # Everything that can fail (code generation) happens before the first assignment.
        forwards = {name: compile_forward(o) for name, o in self._owners.items()}
        quantizers = {site.name: self._quantizer(site.target) for site in self.sites}
        for site in self.sites:
            parent, attr = self._locations[site.name]
            undo(restorer(parent, attr, module_slots(parent).get(attr, ABSENT)))
            if attr in parent.__dict__:  # a function held as a plain attribute (Transformer layers)
                undo(restorer(parent.__dict__, attr, parent.__dict__[attr]))
            setattr(parent, attr, quantizers[site.name])
            if isinstance(parent, TRANSFORMER_LAYERS) and attr == "activation":
                disable_fast_path(parent, undo)
        for name, forward in forwards.items():
            set_forward(self._owners[name].module, forward, undo)


def _plan_of(found: FoundSites, config: ActivationQuantConfig, names: Sequence[str]) -> ActivationPlan:
    """The plan converting the sites ``names`` (in that order); the others are left out."""
    by_name = {s.name: s for s in found.sites}
    chosen = set(names)
    owners = {
        n: TracedOwner(o.module, o.graph, [e for e in found.edits if e.owner == n and e.site in chosen])
        for n, o in found.owners.items()
    }
    return ActivationPlan(
        config,
        sites=[by_name[n] for n in names],
        left_out=[s for s in found.sites if s.name not in chosen],
        not_traced=found.not_traced,
        float_like=found.leftovers.float_like,
        locations={n: found.holders[n] for n in names},
        owners={n: o for n, o in owners.items() if any(e.changes for e in o.edits)},
    )


# ------------------------------------------------------------------------------------------- entry points


def plan_activations(
    module: nn.Module, config: ActivationQuantConfig | None = None, **kwargs: Any
) -> ActivationPlan:
    """Find, name and select the ReLU call sites of ``module`` without changing it.

    ``config`` or its fields as keywords (:class:`~lightning_ste.config.ActivationQuantConfig`). Raises
    ``ValueError`` when no ReLU is found, when an ``include`` pattern matches no site, or when no site is left
    after ``include``/``exclude``. Patterns are globs over the site names (see :meth:`ActivationPlan.format`);
    the call sites of a shared ``nn.ReLU`` also match that module's own name.
    """
    config = ActivationQuantConfig.of(config, **kwargs)
    found = find_sites(module, config.targets)
    names = [s.name for s in found.sites]
    selected, unmatched = select_sites(found.sites, config.include, config.exclude)
    if unmatched:
        raise ValueError(
            f"`include` pattern(s) {unmatched} match no ReLU site of {type(module).__qualname__}; "
            f"sites: {preview(names)}"
        )
    if not selected:
        a = config.to_dict()
        raise ValueError(
            f"no ReLU site left after include={a['include']} exclude={a['exclude']}: `exclude` "
            f"removes every selected site; sites: {preview(names)}"
        )
    return _plan_of(found, config, selected)


def quantize_activations_(
    module: nn.Module, config: ActivationQuantConfig | None = None, *, dry_run: bool = False, **kwargs: Any
) -> list[str]:
    """Turn every ReLU call site of ``module`` into a b-bit QuantReLU in place: y = alpha * clamp(ceil(x / alpha), 0, L) (YLZ19, BCGD19).

    ``config`` or its fields as keywords (:class:`~lightning_ste.config.ActivationQuantConfig`: ``bits``,
    ``ste``, ``alpha``, ``alpha_grad``, ``alpha_lr_scale``, ``rounding``, ``include``, ``exclude``,
    ``calibration_batches``, ``targets``). Returns the names of the converted sites; ``dry_run=True`` prints
    the plan and changes nothing. The model is unchanged when an error is raised.
    """
    check_bool("dry_run", dry_run)
    plan = plan_activations(module, config, **kwargs)
    if (message := plan.warning()) is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    if dry_run:
        print(plan.format(dry_run=True))
        return plan.names
    return plan.apply(module)


def apply_recipe(module: nn.Module, recipe: dict[str, Any]) -> list[str]:
    """Re-apply one recorded activations recipe to a fresh model: convert exactly the recorded sites."""
    recipe = recipe_store.check(recipe, ActivationPlan.kind)
    config = ActivationQuantConfig.from_dict(recipe["arguments"])
    recorded = list(recipe["sites"])
    found = find_sites(module, config.targets)
    known = {s.name for s in found.sites}
    missing = [n for n in recorded if n not in known]
    if missing:
        raise ValueError(
            f"the recipe's sites {missing} are not ReLU call sites of {type(module).__qualname__}; "
            f"found: {preview([s.name for s in found.sites])}"
        )
    return _plan_of(found, config, recorded).apply(module)
