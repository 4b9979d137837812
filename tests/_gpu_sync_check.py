"""Device check (issue 8): with both callbacks on CUDA, steps that do not log never synchronise with the host."""

import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ste import BlendedQuantWeights, QuantizeActivations

N = 4
warnings.simplefilter("ignore")


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.bn = nn.BatchNorm1d(64, affine=False)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        weights = [p for n, p in self.named_parameters() if "alpha" not in n]
        return torch.optim.SGD(weights, lr=0.1, momentum=0.9)


class Guard(pl.Callback):
    def __init__(self, role):
        self.role, self.errors_on = role, []

    def on_train_batch_start(self, trainer, *args):
        if self.role == "start":
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, *args):
        if self.role == "log_steps" and trainer.global_step % N == 0:
            torch.cuda.set_sync_debug_mode(0)  # logging steps may read alpha
        if self.role == "end":
            self.errors_on.append(torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode(0)


def run(precision):
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    model = Net()
    acts, weights = QuantizeActivations(bits=2), BlendedQuantWeights(bits=1, rho=0.01, rho_schedule=(1.01, 0.1))
    end = Guard("end")
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_steps=3 * N, log_every_n_steps=N, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Guard("start"), Guard("log_steps"), acts, weights, end],
    )
    try:
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    alpha = float(model.relu_fx_0.alpha.detach())
    print(precision, "steps", trainer.global_step, "error-mode steps", sum(m == 2 for m in end.errors_on),
          "alpha", alpha, "latent finite", bool(torch.isfinite(model.fc1.parametrizations.weight.original).all()))
    assert trainer.global_step == 3 * N and abs(alpha - 0.6511) > 1e-6
    assert sum(m == 2 for m in end.errors_on) == 3 * N - 3  # non-logging steps ran under "error"


for p in sys.argv[1:] or ["32-true", "bf16-mixed"]:
    run(p)
print("SYNC CHECK OK")
