"""What a ``lightning-ste`` run records: W&B without a login prompt, the full config stored with the run, and
the final table of the validation metrics."""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

__all__ = ["SaveConfigToLoggers", "ensure_wandb_does_not_prompt", "finish_wandb", "format_metrics_table"]

_QUIET_WANDB_MODES = ("offline", "disabled", "dryrun")


def _has_wandb_credentials() -> bool:
    """True when W&B can log in without asking: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def ensure_wandb_does_not_prompt() -> str | None:
    """Set ``WANDB_MODE=offline`` when there are no W&B credentials, so a run never waits for a login.

    Returns the mode it set, or None when it left the environment alone.
    """
    if os.environ.get("WANDB_MODE", "").lower() in _QUIET_WANDB_MODES or _has_wandb_credentials():
        return None
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def finish_wandb() -> None:
    """Close a W&B run the CLI opened, so its (offline) files are complete when the command returns."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def format_metrics_table(metrics: Mapping[str, Any], title: str = "Final validation metrics") -> str:
    """A two-column text table of ``metrics`` (names as logged, values to 4 decimals)."""
    rows = [(k, f"{float(v):.4f}") for k, v in sorted(metrics.items())]
    if not rows:
        return f"{title}: none logged"
    w1 = max(len("metric"), *(len(k) for k, _ in rows))
    w2 = max(len("value"), *(len(v) for _, v in rows))
    line = f"+-{'-' * w1}-+-{'-' * w2}-+"
    out = [title, line, f"| {'metric':<{w1}} | {'value':>{w2}} |", line]
    out += [f"| {k:<{w1}} | {v:>{w2}} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


class SaveConfigToLoggers(SaveConfigCallback):
    """Store the full CLI config with the run: as hyperparameters of every logger, and as a file in W&B's run."""

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            experiment_dir = getattr(getattr(logger, "experiment", None), "dir", None)
            if isinstance(experiment_dir, str) and os.path.isdir(experiment_dir):
                Path(experiment_dir, "lightning_ste_config.yaml").write_text(text)
            elif logger.log_dir:
                os.makedirs(logger.log_dir, exist_ok=True)
                Path(logger.log_dir, "config.yaml").write_text(text)
