"""alpha="calibrate" under DDP: alpha = max|x| / L over the union of every rank's calibration batches.

Two gloo processes on CPU, each with its own data (rank r trains on ``DATA[r]``). The quantized ReLU follows a
frozen Linear, so its input, and the expected alpha, are computed here from the data alone. The largest
calibration input sits in rank 1's second batch: per-rank calibration, an all-gather that keeps rank 0's
value, or calibrating on the first batch only each give a smaller alpha; rank 0's third batch, after
calibration, holds a larger input still, which must not count.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ste import QuantizeActivations

BATCH, STEPS, BITS = 4, 3, 3
LEVELS = 2**BITS - 1


def rank_data() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(BATCH * STEPS, 5, generator=g) for _ in range(2)]
    data[1][BATCH + 1] *= 20  # rank 1, second batch: the largest calibration input
    data[0][2 * BATCH + 1] *= 60  # rank 0, third batch: after calibration, ignored
    return data


class Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.lin.requires_grad_(False)  # its output is the quantizer's input, known from the data
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.lin(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        x = rank_data()[self.trainer.global_rank]
        return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=BATCH)


class DumpRank(pl.Callback):
    """Each process writes the alpha it ends with and the inputs it trained on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[Tensor] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args
    ) -> None:
        self.seen.append(batch[0].detach().clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            "alpha": float(pl_module.act.alpha),
            "seen": self.seen,
            "count": pl_module.act.calibrated_batches,
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_calibrated_alpha_is_the_max_over_all_ranks_and_batches(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = Probe()
    data = rank_data()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            QuantizeActivations(bits=BITS, alpha="calibrate", calibration_batches=2),
            DumpRank(tmp_path),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    # Each rank trained on its own data, batch by batch.
    for r, rank in enumerate(ranks):
        assert torch.equal(torch.cat(rank["seen"]), data[r])

    with torch.no_grad():
        level = [model.lin(d).abs().amax(1) / LEVELS for d in data]  # max|x| / L of each sample, per rank
    calibration = [lv[: 2 * BATCH] for lv in level]  # the first two batches of each rank
    expected = float(torch.cat(calibration).max())
    assert float(calibration[0].max()) < 0.5 * expected  # rank 0 alone would calibrate to much less
    assert float(torch.cat([c[:BATCH] for c in calibration]).max()) < 0.5 * expected  # so would batch 1 alone
    assert float(level[0].max()) > 2 * expected  # and rank 0's third batch would have raised it
    for rank in ranks:
        assert rank["count"] == 2
        assert abs(rank["alpha"] - expected) <= 1e-6 * expected, (rank["alpha"], expected)
