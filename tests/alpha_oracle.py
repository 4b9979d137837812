"""Independent float64 oracles for a learned alpha: its gradient, and where the first optimizer step puts it.

The BCGD19 proxy d sigma / d alpha, per element, by region (L = 2**bits - 1):

    alpha_grad   x <= 0   0 < x <= L*alpha                      x > L*alpha
    ae           0        the level: ceil(x/alpha) or round(x/alpha), clamped to 0..L   L
    mean         0        2**(bits-1)                           L
    min          0        1                                     L
    pact         0        0                                     L

d loss / d alpha = clamp(r * sum(d loss / d y * proxy), -1, 1) per forward, r = ``alpha_lr_scale``.

:class:`AlphaProbe` is a Lightning callback that records, on the first optimizer step, every QuantReLU's
inputs and output gradients, and checks ``alpha.grad`` and the stepped alpha against these formulas with the
settings the *test* expects (never read back from the quantizer, so a setting lost on its way there fails).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

ALPHA_FLOOR = 1e-3


def alpha_proxy(x: Tensor, alpha: float, bits: int, alpha_grad: str, rounding: str = "ceil") -> Tensor:
    """Per-element proxy d sigma / d alpha in float64 (the table above).

    The regions and levels are decided in the quantizer's arithmetic (float32 for float32 and half inputs):
    an input already on the grid (a quantized ReLU feeding another) sits exactly on a region boundary.
    """
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    levels = 2**bits - 1
    a = torch.tensor(max(float(alpha), ALPHA_FLOOR), dtype=x.dtype)
    inside, above = (x > 0) & (x <= levels * a), x > levels * a
    if alpha_grad == "ae":
        k = torch.ceil(x / a) if rounding == "ceil" else torch.round(x / a)
        middle = k.clamp(0, levels).double()
    else:
        middle = torch.full(x.shape, {"mean": 2.0 ** (bits - 1), "min": 1.0, "pact": 0.0}[alpha_grad])
    return torch.where(inside, middle.double(), 0.0) + above.double() * levels


def expected_alpha_grad(
    pairs: list[tuple[Tensor, Tensor]], alpha: float, bits: int, alpha_grad: str, scale: float, rounding: str
) -> float:
    """Sum over the forwards of one optimizer step of clamp(r * sum(dy * proxy(x)), -1, 1)."""
    total = 0.0
    for x, dy in pairs:
        s = scale * float((dy.double() * alpha_proxy(x, alpha, bits, alpha_grad, rounding)).sum())
        total += min(max(s, -1.0), 1.0)
    return total


def expected_first_step(optimizer: torch.optim.Optimizer, group: dict[str, Any], p: float, g: float) -> float:
    """The value of scalar parameter ``p`` after the first step of SGD, Adam or AdamW from an empty state."""
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.AdamW):
        p = p * (1 - lr * wd)
        return p - lr * g / (abs(g) + group["eps"])
    if isinstance(optimizer, torch.optim.Adam):
        g = g + wd * p
        return p - lr * g / (abs(g) + group["eps"])  # m_hat = g, sqrt(v_hat) = |g| on step 1
    if isinstance(optimizer, torch.optim.SGD):
        g = g + wd * p
        if group.get("momentum", 0.0) and group.get("nesterov", False):
            g = g + group["momentum"] * g  # the buffer is g on step 1
        return p - lr * g
    raise NotImplementedError(type(optimizer).__name__)


class AlphaProbe(pl.Callback):
    """Record and check alpha.grad and the first step of every learned alpha against the oracle.

    ``sites``: the QuantReLU names to watch (None: every QuantReLU of the module). ``folder``: where each rank
    writes its record (DDP spawn runs the callback in other processes).
    """

    def __init__(
        self,
        bits: int,
        alpha_grad: str = "mean",
        alpha_lr_scale: float = 0.01,
        rounding: str = "ceil",
        sites: list[str] | None = None,
        folder: Path | None = None,
    ) -> None:
        self.settings = dict(bits=bits, alpha_grad=alpha_grad, scale=alpha_lr_scale, rounding=rounding)
        self.sites, self.folder = sites, folder
        self.pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.record: dict[str, dict[str, float]] = {}
        self._handles: list[Any] = []
        self._done = False

    def _watched(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        from lightning_ste import QuantReLU

        found = {n: m for n, m in pl_module.named_modules() if isinstance(m, QuantReLU)}
        return found if self.sites is None else {n: found[n] for n in self.sites}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._done or self._handles:
            return
        for name, q in self._watched(pl_module).items():
            self.pairs[name] = []

            def pre(q: Any, inputs: tuple[Tensor, ...], name: str = name) -> None:
                if q.training:
                    self.pairs[name].append((inputs[0].detach().clone(), torch.empty(0)))

            def post(q: Any, inputs: Any, y: Tensor, name: str = name) -> None:
                if q.training and y.requires_grad:
                    i = len(self.pairs[name]) - 1

                    def grad_hook(dy: Tensor) -> None:
                        self.pairs[name][i] = (self.pairs[name][i][0], dy.detach().double().clone())

                    y.register_hook(grad_hook)

            self._handles += [q.register_forward_pre_hook(pre), q.register_forward_hook(post)]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._done:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        expected = {}
        for name, q in self._watched(pl_module).items():
            alpha = float(q.alpha.detach())
            expected[name] = expected_alpha_grad(self.pairs[name], alpha, **self.settings)
        names = sorted(expected)
        local = torch.tensor([expected[n] for n in names], dtype=torch.float64)
        if trainer.world_size > 1:  # DDP averages the ranks' gradients
            local = trainer.strategy.all_gather(local).reshape(trainer.world_size, -1).mean(0)
        for name, e in zip(names, local.tolist()):
            q = self._watched(pl_module)[name]
            alpha = float(q.alpha.detach())
            group = where.get(id(q.alpha))
            self.record[name] = {
                "alpha": alpha,
                "grad": float(q.alpha.grad) if q.alpha.grad is not None else math.nan,
                "expected_grad": e,
                "expected_alpha": expected_first_step(optimizer, group, alpha, e) if group else math.nan,
                "elements": sum(x.numel() for x, _ in self.pairs[name]),
            }
        self.pairs = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._done or not self.record:
            return
        self._done = True
        for name, q in self._watched(pl_module).items():
            self.record[name]["stepped"] = float(q.alpha.detach())
        if self.folder is not None:
            torch.save(self.record, Path(self.folder) / f"alpha_probe_rank{trainer.global_rank}.pt")


def check_alpha_record(record: dict[str, dict[str, float]], rel: float = 1e-4, abs_: float = 1e-7) -> None:
    """alpha.grad equals the oracle's gradient and the stepped alpha its first step; something moved."""
    assert record, "the probe saw no optimizer step"
    for name, r in record.items():
        assert r["elements"] > 0, name
        tol = rel * abs(r["expected_grad"]) + abs_
        assert abs(r["grad"] - r["expected_grad"]) <= tol, (name, r)
        assert math.isfinite(r["expected_alpha"]), (name, "alpha is in no optimizer param group")
        assert abs(r["stepped"] - r["expected_alpha"]) <= 1e-6 + 1e-6 * abs(r["alpha"]), (name, r)
    assert any(abs(r["expected_grad"]) > 1e-6 for r in record.values()), record
