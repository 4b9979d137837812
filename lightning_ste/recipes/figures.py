"""Redraw YLZ19 Fig. 1: the teacher-student loss after one coarse-gradient step, versus the step size.

``lightning-ste figure ylz19-fig1 --out fig1.png`` (or ``python -m lightning_ste.recipes.figures ylz19-fig1``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_ste.functional import quantized_relu
from lightning_ste.recipes.data.synthetic import teacher_student

__all__ = ["FIGURES", "main", "one_step_losses", "ylz19_fig1"]


def _loss(z: Tensor, y: Tensor, v: Tensor, w: Tensor, ste: str) -> Tensor:
    """Empirical square loss ``mean((v^T sigma(Z w) - y)^2) / 2`` with the binarized ReLU (YLZ19 §3.1)."""
    one = torch.ones((), dtype=z.dtype)
    return 0.5 * (quantized_relu(z @ w, one, bits=1, ste=ste) @ v - y).pow(2).mean()


def one_step_losses(
    z: Tensor, y: Tensor, v: Tensor, w: Tensor, ste: str, step_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Empirical loss at ``(v, w) - eta * coarse_grad`` for each ``eta`` (YLZ19 Fig. 1).

    The coarse gradient is the gradient of the empirical loss on ``(z, y)`` with the STE ``ste`` in place of
    the binarized ReLU's derivative; returns ``(step_sizes, losses)``.
    """
    v, w = v.clone().requires_grad_(), w.clone().requires_grad_()
    gv, gw = torch.autograd.grad(_loss(z, y, v, w, ste), (v, w))
    with torch.no_grad():
        out = torch.stack([_loss(z, y, v - eta * gv, w - eta * gw, ste) for eta in step_sizes])
    return step_sizes, out


def ylz19_fig1(
    out: str | Path,
    sample_sizes: Sequence[int] = (10, 50, 1000),
    stes: Sequence[str] = ("identity", "relu", "clipped_relu"),
    m: int = 20,
    n: int = 10,
    max_step: float = 0.3,
    num_steps: int = 101,
    seed: int = 0,
) -> dict[int, dict[str, list[float]]]:
    """Plot YLZ19 Fig. 1 to ``out`` (PNG): one panel per sample size, one curve per STE; returns the curves.

    Teacher ``(v*, w*)`` and the student's starting point are drawn once from ``seed``; each panel draws its own
    ``N`` samples ``Z`` (m x n, i.i.d. N(0, 1)) and takes one coarse-gradient step of size ``eta`` in
    ``[0, max_step]``. A descent direction shows a loss that first decreases with ``eta``.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ModuleNotFoundError(
            "drawing a figure needs matplotlib, an optional dependency: pip install 'lightning-ste[plots]'",
            name="matplotlib",
        ) from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(n, generator=g, dtype=torch.float64)
    w_star /= w_star.norm()
    v_star = torch.randn(m, generator=g, dtype=torch.float64)
    v0 = torch.randn(m, generator=g, dtype=torch.float64)
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    w0 /= w0.norm()
    etas = torch.linspace(0.0, max_step, num_steps, dtype=torch.float64)
    curves: dict[int, dict[str, list[float]]] = {}
    fig, axes = plt.subplots(1, len(sample_sizes), figsize=(4.2 * len(sample_sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sample_sizes):
        z, y = teacher_student(w_star, v_star, size, g)
        curves[size] = {}
        for ste in stes:
            _, losses = one_step_losses(z, y, v0, w0, ste, etas)
            curves[size][ste] = losses.tolist()
            ax.plot(etas.numpy(), losses.numpy(), label=ste)
        ax.set_title(f"sample size {size}")
        ax.set_xlabel("step size $\\eta$")
        ax.set_ylabel("empirical loss after one step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="STE")
    fig.suptitle("YLZ19 Fig. 1 (redrawn): one coarse-gradient step, binarized ReLU teacher-student")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return curves


FIGURES = {"ylz19-fig1": ylz19_fig1}


def main(argv: Sequence[str] | None = None) -> None:
    """``figure NAME --out PATH``: draw one of :data:`FIGURES`."""
    parser = argparse.ArgumentParser(
        prog="lightning-ste figure", description="Redraw a figure of the papers."
    )
    parser.add_argument("name", choices=sorted(FIGURES))
    parser.add_argument("--out", default=None, help="PNG path (default: <name>.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-sizes", type=int, nargs="+", default=[10, 50, 1000])
    parser.add_argument("--max-step", type=float, default=0.3)
    args = parser.parse_args(argv)
    out = args.out or f"{args.name}.png"
    FIGURES[args.name](out, sample_sizes=args.sample_sizes, max_step=args.max_step, seed=args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
