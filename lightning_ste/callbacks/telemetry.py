"""QuantTelemetry: see what quantization is doing while a low-bit network trains.

Per activation quantizer (every :class:`~lightning_ste.QuantReLU`): alpha, the share of inputs clipped
above ``L * alpha``, the share at zero and the share on every level (:mod:`lightning_ste.occupancy`). Per
quantized weight layer (:func:`lightning_ste.inspect.quantized_layers`): the flip ratio (share of quantized
codes changed since the last log, as Larq's flip ratio), the relative quantization error
``||q(W) - W|| / ||W||`` and the current BCGD rho (BCGD19; docs/math.md §2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_ste import _compat
from lightning_ste.config import ALPHA_FLOOR, check_bool, check_count
from lightning_ste.inspect import activation_sites, quantized_layers
from lightning_ste.occupancy import level_counts, matplotlib_available, occupancy_figure
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

__all__ = ["CHART_FILENAME", "QuantTelemetry"]

CHART_FILENAME = "quant_level_occupancy.png"


@dataclass
class _Window:
    """Counts of one activation quantizer since the last log, kept on the device."""

    occupancy: Tensor
    clipped: Tensor
    count: int = 0  # host-side: numel is known without reading the device

    def reset(self) -> None:
        self.occupancy.zero_()
        self.clipped.zero_()
        self.count = 0


@dataclass
class _WeightLayer:
    layer: nn.Module
    quantizer: WeightQuantizer
    previous: Tensor | None = None  # int8 codes at the last log

    @property
    def latent(self) -> Tensor:
        # Read live: while torch.nn.utils.prune holds the latent, every forward replaces it by W ⊙ M.
        return next(quantized_layers(self.layer)).latent

    def codes(self) -> tuple[Tensor, Tensor]:
        return self.quantizer.weight_codes(self.latent.detach())


@dataclass
class _State:
    activations: dict[str, tuple[QuantReLU, _Window]] = field(default_factory=dict)
    weights: dict[str, _WeightLayer] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)


class QuantTelemetry(Callback):
    """Log alpha, clipping, zeros, level occupancy, weight flips, quantization error and rho of a quantized model.

    Every ``log_every_n_steps`` optimizer steps, to every logger of the trainer, under
    ``quant/<layer>/<stat>``:

    - activation quantizers (:class:`~lightning_ste.QuantReLU`): ``alpha``, ``clipped`` (share of inputs
      ``> L * alpha``, where the clipped-ReLU STE passes no gradient, YLZ19), ``zero`` (share quantized to 0),
      ``level_<k>`` (share quantized to level ``k``, with ``log_levels``);
    - weight layers (parametrized by :class:`~lightning_ste.WeightQuantizer`): ``flip_ratio`` (share of
      quantized codes changed since the previous log, or since fit start for the first), ``quant_error``
      (``||q(W) - W|| / ||W||``) and ``rho`` (of a :class:`~lightning_ste.BlendedQuantWeights` callback, BCGD19).

    Activation statistics are accumulated on the device by forward hooks over the training batches only; the
    host reads them (one transfer) only on the steps that log, summed over processes in distributed runs.
    With a :class:`~lightning.pytorch.loggers.WandbLogger` a histogram of alpha across layers is logged too,
    and at the end of training a per-layer level-occupancy chart; the chart is also written as
    ``quant_level_occupancy.png`` to the trainer's log directory (it needs matplotlib, the ``plots`` extra;
    without it the chart is skipped with one warning). ``enabled=False`` turns all of it off.

    The activation statistics cost a few elementwise passes over every quantizer input of a training step
    (ResNet-18 W1A4, batch 128, 224x224, bf16-mixed on an H200: 38.0 -> 50.7 ms a step);
    ``collect_every_n_steps=n`` samples one optimizer step in ``n`` instead (40.2 ms with ``n=10``), the
    shares then being over the sampled steps.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        enabled: bool = True,
        log_levels: bool = True,
        occupancy_chart: bool = True,
        collect_every_n_steps: int = 1,
    ) -> None:
        check_count("log_every_n_steps", log_every_n_steps)
        check_count("collect_every_n_steps", collect_every_n_steps)
        for name, value in (
            ("enabled", enabled),
            ("log_levels", log_levels),
            ("occupancy_chart", occupancy_chart),
        ):
            check_bool(name, value)
        self.log_every_n_steps, self.collect_every_n_steps = log_every_n_steps, collect_every_n_steps
        self.enabled, self.log_levels, self.occupancy_chart = enabled, log_levels, occupancy_chart
        self.last_metrics: dict[str, float] = {}
        self.last_occupancy: dict[str, list[float]] = {}
        self.chart_path: str | None = None
        self._state = _State()
        self._collecting = False
        self._last_step = -1

    # ------------------------------------------------------------------------------------- lifecycle

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After every callback's setup: the conversion callbacks have installed the quantizers by now.
        self._remove_hooks()
        self._state = _State()
        self.last_metrics, self.last_occupancy, self.chart_path = {}, {}, None
        if not self.enabled:
            return
        for name, module in activation_sites(pl_module):
            window = _Window(
                occupancy=torch.zeros(module.levels + 1, dtype=torch.int64, device=module.alpha.device),
                clipped=torch.zeros((), dtype=torch.int64, device=module.alpha.device),
            )
            self._state.activations[name] = (module, window)
            hook = self._make_hook(window)
            self._state.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        for quantized in quantized_layers(pl_module):
            entry = _WeightLayer(quantized.layer, quantized.quantizer)
            entry.previous = entry.codes()[0].to(torch.int8)
            self._state.weights[quantized.name] = entry
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._collecting = self.enabled and trainer.global_step % self.collect_every_n_steps == 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collecting = False
        if not self.enabled:
            return
        step = trainer.global_step
        # global_step counts optimizer steps: with gradient accumulation it stays put between them.
        if step != self._last_step and step % self.log_every_n_steps == 0:
            self._last_step = step
            self._log(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.enabled and self.occupancy_chart and self._state.activations):
            return
        occupancy = self.last_occupancy or self._window_occupancy(trainer)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank makes it
        if not trainer.is_global_zero or not occupancy:
            return
        if matplotlib_available():
            os.makedirs(log_dir, exist_ok=True)
            self.chart_path = os.path.join(log_dir, CHART_FILENAME)
            figure = occupancy_figure(
                occupancy, {n: float(m.alpha.detach()) for n, (m, _) in self._state.activations.items()}
            )
            figure.savefig(self.chart_path, dpi=100)
            rank_zero_info(f"QuantTelemetry: level-occupancy chart written to {self.chart_path}")
        else:
            # An optional output: the run must not fail for it (the shares are logged as numbers anyway).
            rank_zero_warn(
                "QuantTelemetry: matplotlib is not installed, so the level-occupancy chart "
                f"({CHART_FILENAME}) was skipped; `pip install 'lightning-ste[plots]'` (or matplotlib) draws it. "
                "The shares are still logged as quant/<layer>/level_<k>."
            )
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            table = wandb.Table(columns=["layer", "level", "share"])
            for name, shares in occupancy.items():
                for level, share in enumerate(shares):
                    table.add_data(name, level, share)
            media: dict[str, Any] = {"quant/level_occupancy_table": table}
            if self.chart_path is not None:
                media["quant/level_occupancy"] = wandb.Image(self.chart_path)
            for lg in wandb_loggers:
                lg.experiment.log(media)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._collecting = False

    # ------------------------------------------------------------------------------------- internals

    def _make_hook(self, window: _Window) -> Callable[..., None]:
        def hook(module: QuantReLU, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Tensor) -> None:
            if not (self._collecting and module.training):
                return
            x = args[0] if args else kwargs["x"]
            counts, clipped = level_counts(x, module.alpha, module.bits, module.rounding)
            window.occupancy += counts
            window.clipped += clipped
            window.count += x.numel()

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._state.handles:
            handle.remove()
        self._state.handles.clear()

    def _reduced_counts(self, trainer: Trainer) -> Tensor | None:
        """All activation windows as one int64 vector ``[occupancy..., clipped, count]`` per quantizer."""
        parts = []
        for _, window in self._state.activations.values():
            count = torch.tensor([window.count], dtype=torch.int64, device=window.clipped.device)
            parts += [window.occupancy, window.clipped.view(1), count]
        if not parts:
            return None
        counts = torch.cat(parts)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts

    def _window_occupancy(self, trainer: Trainer) -> dict[str, list[float]]:
        counts = self._reduced_counts(trainer)
        if counts is None:
            return {}
        values, out, i = counts.cpu().tolist(), {}, 0
        for name, (module, _) in self._state.activations.items():
            n = module.levels + 1
            total = values[i + n + 1]
            if total:
                out[name] = [c / total for c in values[i : i + n]]
            i += n + 2
        return out

    @torch.no_grad()
    def _log(self, trainer: Trainer) -> None:
        state = self._state
        counts = self._reduced_counts(trainer)
        device_values: list[Tensor] = []
        if counts is not None:
            device_values.append(counts.double())
            device_values += [
                m.alpha.detach().double().view(1).to(counts.device) for m, _ in state.activations.values()
            ]
        weight_stats = []
        for entry in state.weights.values():
            codes, scale = entry.codes()
            w = entry.latent.detach()
            flips = (codes != entry.previous).sum() if entry.previous is not None else codes.new_zeros(())
            error = torch.linalg.vector_norm((codes * scale - w).float()) / torch.linalg.vector_norm(
                w.float()
            ).clamp_min(torch.finfo(torch.float32).tiny)
            weight_stats.append(torch.stack([flips.double(), error.double()]))
            entry.previous = codes.to(torch.int8)
        if weight_stats:
            device = weight_stats[0].device
            device_values = [v.to(device) for v in device_values] + weight_stats
        # The one host read of the window.
        values = torch.cat(device_values).cpu().tolist() if device_values else []

        metrics: dict[str, float] = {}
        occupancy: dict[str, list[float]] = {}
        alphas: list[float] = []
        i = 0
        if counts is not None:
            n_counts = counts.numel()
            j = n_counts
            for name, (module, window) in state.activations.items():
                n = module.levels + 1
                levels, clipped, total = values[i : i + n], values[i + n], values[i + n + 1]
                alpha = max(values[j], ALPHA_FLOOR)
                alphas.append(alpha)
                metrics[f"quant/{name}/alpha"] = alpha
                if total:
                    shares = [c / total for c in levels]
                    occupancy[name] = shares
                    metrics[f"quant/{name}/clipped"] = clipped / total
                    metrics[f"quant/{name}/zero"] = shares[0]
                    if self.log_levels:
                        metrics.update({f"quant/{name}/level_{k}": s for k, s in enumerate(shares)})
                window.reset()
                i += n + 2
                j += 1
            i = j
        rho = self._rho(trainer)
        for name, entry in state.weights.items():
            flips, error = values[i], values[i + 1]
            metrics[f"quant/{name}/flip_ratio"] = flips / max(entry.latent.numel(), 1)
            metrics[f"quant/{name}/quant_error"] = error
            if rho is not None:
                metrics[f"quant/{name}/rho"] = rho
            i += 2
        self.last_metrics = metrics
        if occupancy:
            self.last_occupancy = occupancy
        if not metrics:
            return
        step = _compat.batches_that_stepped(trainer)  # the step Lightning's own self.log uses
        for lg in trainer.loggers:
            extra: dict[str, Any] = {}
            if isinstance(lg, WandbLogger) and alphas:
                import wandb

                extra["quant/alpha_histogram"] = wandb.Histogram(
                    alphas, num_bins=min(64, max(len(alphas), 1))
                )
            lg.log_metrics({**metrics, **extra}, step=step)

    @staticmethod
    def _rho(trainer: Trainer) -> float | None:
        from lightning_ste.callbacks.blended_quant_weights import BlendedQuantWeights

        for cb in trainer.callbacks:  # type: ignore[attr-defined]  # public; the Trainer's annotations omit it
            if isinstance(cb, BlendedQuantWeights):
                rho = cb.rho
                return float(rho.detach()) if isinstance(rho, Tensor) else float(rho)
        return None
