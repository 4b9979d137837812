"""Small pieces of setup that several test files share: a CPU Trainer that writes nothing, a tiny MLP
classifier (and its SGD base), and the two halves of the torch.compile checks (a graph-recording backend, eager-vs-compiled runs).

Plain functions and classes, imported by the test files (``from fixtures import quiet_trainer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

QUIET: dict[str, Any] = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpointing, progress bar or model summary; ``kwargs`` add to or
    override these."""
    return pl.Trainer(**{**QUIET, **kwargs})


class SGDClassifier(pl.LightningModule):
    """``self.net`` (set by the subclass) trained with cross-entropy on ``(x, y)`` batches and SGD."""

    net: nn.Module

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class MLPClassifier(SGDClassifier):
    """Linear layers of the given widths with a ReLU between each two, in an ``nn.Sequential``."""

    def __init__(self, *widths: int, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__(lr, momentum)
        layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
        for n_in, n_out in zip(widths[1:], widths[2:]):
            layers += [nn.ReLU(), nn.Linear(n_in, n_out)]
        self.net = nn.Sequential(*layers)


def recording_backend(graphs: list[str]) -> Callable:
    """A torch.compile backend that appends the forward and the backward graph (as text) to ``graphs`` and
    runs them as traced, without Inductor."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def record(gm: torch.fx.GraphModule, inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=record, bw_compiler=record)

    return backend


def outputs_and_grads(
    fns: Iterable[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    g: torch.Tensor,
    alpha: float,
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(y, grad of x, grad of alpha) of each ``fn(x, alpha)`` backpropagating ``g``, each from fresh leaves
    (alpha a scalar on x's device)."""
    results = []
    for fn in fns:
        xi = x.clone().requires_grad_(True)
        a = torch.tensor(alpha, device=x.device, requires_grad=True)
        y = fn(xi, a)
        y.backward(g)
        results.append((y.detach(), xi.grad, a.grad))
    return results
