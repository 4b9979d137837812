"""Nothing optional crashes a run: every callback of the package trains, logs (CSV and offline W&B) and ends in
a process where matplotlib cannot be imported; the chart degrades to one warning naming what to install, and
``lightning-ste figure`` to a one-screen error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import contextlib, importlib.util, io, json, sys, warnings
from pathlib import Path


from importlib.machinery import PathFinder

# An environment without matplotlib: the finder of installed packages does not see it, so
# importlib.util.find_spec("matplotlib") is None, `import matplotlib` raises ModuleNotFoundError and no
# installed distribution of that name is listed (what torchmetrics and Lightning check).
_find_spec = PathFinder.find_spec.__func__


def _find_spec_without_matplotlib(cls, name, path=None, target=None):
    if name.split(".")[0] in ("matplotlib", "mpl_toolkits", "pylab"):
        return None
    return _find_spec(cls, name, path, target)


_find_distributions = PathFinder.find_distributions  # a staticmethod


def _distributions_without_matplotlib(*args, **kwargs):
    for dist in _find_distributions(*args, **kwargs):
        if dist.metadata["Name"].lower() != "matplotlib":
            yield dist


PathFinder.find_spec = classmethod(_find_spec_without_matplotlib)
PathFinder.find_distributions = staticmethod(_distributions_without_matplotlib)
assert importlib.util.find_spec("matplotlib") is None
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ste
from lightning_ste.recipes.cli import main

out = Path(sys.argv[1])


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16)
telemetry = lightning_ste.QuantTelemetry(log_every_n_steps=1)
callbacks = [
    lightning_ste.QuantizeActivations(bits=2),
    lightning_ste.BlendedQuantWeights(bits=1),
    telemetry,
    lightning_ste.QuantSummary(),
]
loggers = [CSVLogger(str(out)), WandbLogger(offline=True, save_dir=str(out), project="lightning-ste-tests")]
trainer = pl.Trainer(
    max_epochs=2, accelerator="cpu", callbacks=callbacks, logger=loggers, log_every_n_steps=1,
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.fit(Net(), data)
import wandb

wandb.finish()
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        main(["figure", "ylz19-fig1", "--out", str(out / "fig.png")])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
print(json.dumps({
    "finished": trainer.state.finished,
    "steps": trainer.global_step,
    "quant_keys": sorted(k for k in telemetry.last_metrics if k.startswith("quant/")),
    "chart_path": telemetry.chart_path,
    "warnings": [str(w.message) for w in caught if "matplotlib" in str(w.message)],
    "matplotlib_loaded": any(m.split(".")[0] == "matplotlib" for m in sys.modules),
    "figure_code": code,
    "figure_stderr": err.getvalue(),
}))
"""


def test_every_callback_runs_without_matplotlib(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finished"] and result["steps"] == 8
    assert not result["matplotlib_loaded"]
    # The numbers are all there; only the PNG is missing, said once, with what to install.
    assert {"quant/net.1/alpha", "quant/net.1/level_3", "quant/net.0/flip_ratio"} <= set(result["quant_keys"])
    assert result["chart_path"] is None
    assert len(result["warnings"]) == 1 and "pip install 'lightning-ste[plots]'" in result["warnings"][0]
    assert not list(tmp_path.rglob("*.png"))
    # The figure command: exit status 2 and one short message saying what to install, no traceback.
    assert result["figure_code"] == 2
    lines = result["figure_stderr"].strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in result["figure_stderr"]
    assert "needs matplotlib" in lines[0] and "lightning-ste[plots]" in lines[0]
