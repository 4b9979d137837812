"""Real-MNIST test accuracy of a small CNN with W1 / W2 weights and 4-bit activations: BCGD vs BinaryConnect.

Every run starts from the same seed (same initial weights, same batch order); only ``bits`` and ρ change:
BCGD19 with ρ = 1e-5 against BinaryConnect (ρ = 0). Activations are 4-bit QuantReLUs with learned α
(:class:`lightning_ste.QuantizeActivations`). Data are held in memory (no workers).

    python benchmarks/mnist_weights_accuracy.py --root ../shared/data --epochs 2

``--train-size`` trains on the first N training images (default: all 60,000); the test set is always the
full 10,000. ``--float`` adds a float-weight reference run with the same 4-bit activations.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

from lightning_ste import BlendedQuantWeights, QuantizeActivations


def load_mnist(root: Path, train: bool, size: int | None = None) -> TensorDataset:
    ds = MNIST(str(root), train=train, download=False)
    x = ds.data[:size].float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    return TensorDataset(x, ds.targets[:size].clone())


class SmallCNN(L.LightningModule):
    """conv5x5(32)-BN-ReLU-pool, conv5x5(64)-BN-ReLU-pool, fc(1024->256)-BN-ReLU, fc(256->10)."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(1024, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        # BCGD19 code: SGD, momentum 0.95, weight decay 1e-4 (here constant lr, two epochs from scratch).
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.95, weight_decay=1e-4)
        return opt


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(data, batch_size=1000):
        correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(data)


def run(
    bits: int | None, rho: float, args: argparse.Namespace, train: TensorDataset, test: TensorDataset
) -> dict:
    L.seed_everything(args.seed, verbose=False)
    model = SmallCNN(lr=args.lr)
    callbacks: list[L.Callback] = [QuantizeActivations(bits=4)]
    if bits is not None:
        callbacks.append(BlendedQuantWeights(bits=bits, rho=rho))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    return {
        "weights": "float" if bits is None else f"W{bits}",
        "rho": rho,
        "acc": accuracy(model, test),
        "s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=os.environ.get("LIGHTNING_STE_MNIST", "../shared/data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float", action="store_true", help="add a float-weight reference run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_mnist(Path(args.root), True, args.train_size)
    test = load_mnist(Path(args.root), False)
    configs: list[tuple[int | None, float]] = [(1, 1e-5), (1, 0.0), (2, 1e-5), (2, 0.0)]
    if args.float:
        configs.insert(0, (None, 0.0))
    rows = []
    for bits, rho in configs:
        rows.append(run(bits, rho, args, train, test))
        r = rows[-1]
        print(f"{r['weights']} A4 rho={r['rho']:g}: test acc {r['acc']:.2f}% ({r['s']:.0f} s)", flush=True)
    print(
        f"\nMNIST, small CNN, {args.epochs} epochs, {len(train)} train / {len(test)} test images, seed {args.seed}"
    )
    print("| weights | activations | method | rho | test acc (%) | train time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        method = "float" if r["weights"] == "float" else ("BCGD" if r["rho"] else "BinaryConnect")
        print(f"| {r['weights']} | A4 | {method} | {r['rho']:g} | {r['acc']:.2f} | {r['s']:.0f} |")


if __name__ == "__main__":
    main()
