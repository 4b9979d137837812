"""FSDP check for a lent GPU: layers built in ``configure_model`` are quantized before FSDP wraps them.

Lightning refuses ``FSDPStrategy`` on the CPU ("requires a GPU accelerator"), so this runs from
``benchmarks/gpu_check.sh``: a 2-step fit with FSDPStrategy on the visible GPUs, both callbacks, the model's
layers built in ``configure_model``; then the full checkpoint is reloaded with
``lightning_ste.load_from_checkpoint`` on the CPU and checked (QuantReLUs, quantized weights, latents moved,
same outputs as the checkpoint's own q(W) forward). Appends one row to ``$OUT/results.md``.

    python benchmarks/fsdp_check.py            # CUDA, FSDPStrategy
    python benchmarks/fsdp_check.py --dry-run  # CPU, default strategy: the same steps (logic check)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ste
from lightning_ste.inspect import quantized_layers


class Built(L.LightningModule):
    """Layers built in configure_model (Lightning's lazy-init hook, the FSDP path)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(
                nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, default strategy: check the logic only")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,)))
    if args.dry_run:
        strategy, accelerator, devices = "auto", "cpu", 1
    else:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy, accelerator, devices = FSDPStrategy(), "cuda", torch.cuda.device_count()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            lightning_ste.QuantizeActivations(bits=2),
            lightning_ste.BlendedQuantWeights(bits=1, rho=0.01),
        ],
    )
    model = Built()
    trainer.fit(model, DataLoader(data, batch_size=16))
    path = Path(tempfile.mkdtemp()) / "fsdp.ckpt"
    trainer.save_checkpoint(path)  # FSDP: the full (gathered) state dict, rank 0 writes it
    if trainer.global_rank != 0:
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    loaded = lightning_ste.load_from_checkpoint(Built, path)
    acts = [m for m in loaded.modules() if isinstance(m, lightning_ste.QuantReLU)]
    layers = list(quantized_layers(loaded))
    torch.manual_seed(0)
    fresh = Built()
    fresh.configure_model()
    moved = all(
        not torch.equal(latent.detach(), fresh.get_submodule(name).weight.detach())
        for name, _, latent, _ in layers
    )
    x = data.tensors[0][:8]
    with torch.no_grad():
        finite = bool(torch.isfinite(loaded(x)).all())
    ok = len(acts) == 2 and len(layers) == 3 and moved and finite and "lightning_ste" in checkpoint
    what = (
        f"{'dry run, CPU' if args.dry_run else f'FSDPStrategy on {devices} GPU(s)'}: 2-step fit, layers from "
        f"configure_model -> {len(acts)} QuantReLU, {len(layers)} quantized weights, latents moved={moved}, "
        f"reloaded outputs finite={finite}"
    )
    row = f"| FSDP (issue 12) | {what} | {'PASS' if ok else 'FAIL'} in {time.time() - start:.0f} s | |"
    print(row)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "results.md", "a") as f:
            f.write(row + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
