"""MNIST test accuracy of a small CNN after one epoch: float ReLU vs b-bit QuantizeActivations (same seed).

    python benchmarks/mnist_activations_accuracy.py --data ../shared/data --bits 0 2 4

``--bits 0`` is the float baseline. The whole of MNIST is held in memory as tensors (no workers); the
model is 2 conv + 2 fc layers with ReLU, trained with Adam (lr 1e-3, batch 64) by a real lightning.Trainer.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

from lightning_ste import QuantizeActivations


class SmallCNN(pl.LightningModule):
    """conv5x5(16) - ReLU - pool - conv5x5(32) - ReLU - pool - fc(128) - ReLU - fc(10)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 128), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def tensors(root: str, train: bool) -> TensorDataset:
    data = MNIST(root, train=train, download=False)
    x = data.data.float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    return TensorDataset(x, data.targets)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    correct = sum(
        int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000)
    )
    return correct / len(y)


def run(
    bits: int, train: TensorDataset, test: TensorDataset, args: argparse.Namespace
) -> tuple[float, float]:
    pl.seed_everything(args.seed, verbose=False)
    model = SmallCNN(lr=args.lr)
    callbacks = [QuantizeActivations(bits=bits, alpha=args.alpha)] if bits else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    return accuracy(model, test), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--bits", type=int, nargs="+", default=[0, 2, 4], help="0 = float")
    parser.add_argument("--alpha", default="learned")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    train, test = tensors(args.data, True), tensors(args.data, False)
    print(f"| activations | alpha | MNIST test accuracy after {args.epochs} epoch(s) | train time (s) |")
    print("|---|---|---|---|")
    for bits in args.bits:
        acc, seconds = run(bits, train, test, args)
        label = f"{bits}-bit QuantReLU" if bits else "float ReLU"
        print(f"| {label} | {args.alpha if bits else '-'} | {100 * acc:.2f}% | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
