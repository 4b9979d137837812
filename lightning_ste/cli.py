"""``lightning-ste``: the LightningCLI entry point of the recipes (fit/validate/test/predict) and ``figure``.

Recipes are YAML files under ``recipes/``; any ``--section.key value`` overrides them. Besides ``model``,
``data`` and ``trainer``, the CLI has three callback sections: ``activations`` and ``weights`` (optional:
the quantization callbacks, e.g. ``lightning_ste.callbacks.activations.QuantizeActivations``) and
``checkpoint`` (a ``ModelCheckpoint``), so ``--activations.ste relu`` overrides the STE of a recipe.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["LightningSTECLI", "ensure_wandb_does_not_prompt", "format_metrics_table", "main", "run_cli"]

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


class _SaveConfigToLoggers(SaveConfigCallback):
    """Store the full CLI config with the run: as hyperparameters of every logger, and as a file in W&B's run."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            experiment_dir = getattr(getattr(logger, "experiment", None), "dir", None)
            if isinstance(experiment_dir, str) and os.path.isdir(experiment_dir):
                Path(experiment_dir, "lightning_ste_config.yaml").write_text(text)
            elif getattr(logger, "log_dir", None):
                os.makedirs(logger.log_dir, exist_ok=True)
                Path(logger.log_dir, "config.yaml").write_text(text)


class LightningSTECLI(LightningCLI):
    """LightningCLI with the quantization callback sections and a final table of the validation metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Callback, "activations", subclass_mode=True, required=False)
        parser.add_lightning_class_args(Callback, "weights", subclass_mode=True, required=False)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # An absent optional callback section is None: leave it out of the Trainer's callbacks.
        keys = self._parser(self.subcommand).callback_keys
        extra = [c for c in (self._get(self.config_init, k) for k in keys) if c is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)

    def after_fit(self) -> None:
        self.final_metrics = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith("val/") and v.numel() == 1
        }
        self._print_table()

    @rank_zero_only
    def _print_table(self) -> None:
        epoch = self.trainer.current_epoch - 1 if self.trainer.current_epoch else 0
        title = f"Final validation metrics (epoch {epoch}, step {self.trainer.global_step})"
        print(format_metrics_table(self.final_metrics, title), flush=True)
        ckpt = self.trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.last_model_path:
            print(f"last checkpoint: {ckpt.last_model_path}", flush=True)


def _finish_wandb() -> None:
    """Close a W&B run the CLI opened, so its (offline) files are complete when the command returns."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningSTECLI | None:
    """Run ``lightning-ste`` with ``args`` and return the CLI object (None for ``figure``); for tests and scripts."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "figure":
        from lightning_ste import figures

        figures.main(argv[1:])
        return None
    if ensure_wandb_does_not_prompt():
        print(
            "lightning-ste: no W&B credentials found, W&B runs offline (WANDB_MODE=offline)", file=sys.stderr
        )
    try:
        return LightningSTECLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=_SaveConfigToLoggers,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"default_env": False},
            args=argv,
            run=run,
        )
    finally:
        _finish_wandb()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-ste``: ``fit|validate|test|predict --config RECIPE.yaml [--a.b value ...]``,
    or ``figure NAME --out PATH``."""
    run_cli(args)


if __name__ == "__main__":
    main()
