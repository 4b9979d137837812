"""One epoch of the MNIST LeNet-5 A4 recipe (Lightning) against a plain PyTorch loop over the same tensors.

Both train the same network (LeNet-5 with affine-free BatchNorm, 4-bit activations, alpha fixed, clipped-ReLU
STE: ``recipes/mnist/lenet5_a4.yaml``) with SGD (lr 0.1, momentum 0.9, weight decay 1e-4), batch 64, on the
same in-memory training tensors. The Lightning side is the recipe's own pieces: ``Classifier``,
``MNISTDataModule``, ``QuantizeActivations``, a ``Trainer`` (no logger, no checkpoint, no validation); the plain
side shuffles with ``randperm`` and slices batches. Epochs are interleaved; only the epoch itself is timed
(``on_train_epoch_start`` to ``on_train_epoch_end`` for Lightning).

    python benchmarks/bench_mnist_epoch.py --root /path/with/MNIST/raw [--subset 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_ste.callbacks.quantize_activations import QuantizeActivations
from lightning_ste.recipes.data import MNISTDataModule
from lightning_ste.recipes.models import Classifier
from lightning_ste.recipes.models.lenet5 import LeNet5
from lightning_ste.surgery.activation_plan import quantize_activations_

ACT = {"bits": 4, "ste": "clipped_relu", "alpha": "fixed"}
OPT = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(data: MNISTDataModule, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    model = Classifier(arch="lenet5", num_classes=10, **OPT)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QuantizeActivations(**ACT), timer],
    )
    trainer.fit(model, datamodule=data)
    return timer.seconds


def plain_epoch(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    net = LeNet5(num_classes=10)
    quantize_activations_(net, **ACT)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), **OPT)
    start = time.perf_counter()
    order = torch.randperm(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=None, help="folder holding MNIST/raw (default: $LIGHTNING_STE_DATA)"
    )
    parser.add_argument("--subset", type=int, default=None, help="training images (default: all 60000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    data = MNISTDataModule(root=args.root, batch_size=args.batch_size, subset=args.subset, download=False)
    data.prepare_data()
    data.setup("fit")
    x, y = data.train_data

    light, plain = [], []
    plain_epoch(x[:2048], y[:2048], args.batch_size, 0)  # warm-up: first-call costs off the clock
    lightning_epoch(
        MNISTDataModule(root=args.root, batch_size=args.batch_size, subset=2048, download=False), 0
    )
    for r in range(args.rounds):
        light.append(lightning_epoch(data, r))
        plain.append(plain_epoch(x, y, args.batch_size, r))
    ratios = [a / b for a, b in zip(light, plain)]
    print(
        f"MNIST LeNet-5 A4 epoch, {len(y)} images, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"Lightning recipe  median {statistics.median(light):7.2f} s")
    print(f"plain PyTorch     median {statistics.median(plain):7.2f} s")
    print(f"ratio min/median/max {min(ratios):.2f}/{statistics.median(ratios):.2f}/{max(ratios):.2f}")


if __name__ == "__main__":
    main()
