"""``lightning-ste``: the LightningCLI entry point of the recipes (fit/validate/test/predict), ``recipes`` and
``figure``.

Recipes are YAML files under ``recipes/`` (:mod:`.recipe_files`); any ``--section.key value`` overrides them.
Besides ``model``, ``data`` and ``trainer``, the CLI has three callback sections: ``activations`` and
``weights`` (optional: the quantization callbacks, e.g. ``lightning_ste.QuantizeActivations``) and
``checkpoint`` (a ``ModelCheckpoint``), so ``--activations.ste relu`` overrides the STE of a recipe, and
``--compile true`` (or a backend name) runs ``torch.compile`` on the model. A user error (a rejected setting, a
missing file, a GPU recipe on a CPU-only machine, an unknown key) is one short message and exit status 2
(:mod:`.errors`); ``--debug`` or ``LIGHTNING_STE_DEBUG=1`` shows the full traceback. On SIGTERM a checkpoint is
saved before the run stops (:class:`.preemption.SaveOnSigterm`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_ste import _compat
from lightning_ste.recipes.errors import (
    CALLBACK_SECTIONS,
    DEBUG_ENV,
    EXIT_USER_ERROR,
    PROG,
    RecipeError,
    first_user_error,
    one_screen,
    setting_of,
    unknown_key_hint,
)
from lightning_ste.recipes.preemption import EXIT_SIGTERM, SaveOnSigterm, take_saved_checkpoint
from lightning_ste.recipes.recipe_files import format_recipes, list_recipes, recipe_writing, with_bases
from lightning_ste.recipes.run_logging import (
    SaveConfigToLoggers,
    ensure_wandb_does_not_prompt,
    finish_wandb,
    format_metrics_table,
)

__all__ = [
    "EXIT_SIGTERM",
    "EXIT_USER_ERROR",
    "LightningSTECLI",
    "RecipeError",
    "SaveOnSigterm",
    "ensure_wandb_does_not_prompt",
    "format_metrics_table",
    "format_recipes",
    "list_recipes",
    "main",
    "run_cli",
]


class LightningSTECLI(_compat.AroundSubcommand, LightningCLI):
    """LightningCLI with the quantization callback sections, ``--compile``, SIGTERM checkpoints, one-screen user
    errors (:class:`RecipeError`) and a final table of the validation metrics."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        activations, weights, checkpoint = CALLBACK_SECTIONS
        parser.add_lightning_class_args(Callback, activations, subclass_mode=True, required=False)
        parser.add_lightning_class_args(Callback, weights, subclass_mode=True, required=False)
        parser.add_lightning_class_args(ModelCheckpoint, checkpoint)
        parser.add_argument(
            "--compile",
            type=bool | str,
            default=False,
            help="torch.compile the model's forward: true (inductor) or a backend name; false: eager",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            if args is None:  # the command line, each recipe preceded by the base files it names
                with _argv(with_bases(sys.argv[1:])):
                    super().parse_arguments(parser, None)
            else:
                super().parse_arguments(parser, with_bases(args) if isinstance(args, list) else args)
        except argparse.ArgumentError as err:
            message = str(err).strip()
            hint = unknown_key_hint(message, parser)
            argv = args if isinstance(args, list) else sys.argv[1:]
            sub = next((a for a in argv if a in self.subcommands()), None)
            more = f" (all settings: {PROG} {sub} --help)" if sub else f" (see {PROG} --help)"
            raise RecipeError(f"{message}{'; ' + hint if hint else ''}{more}") from err

    def _sub_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _setting(self, key: str, default: Any = None) -> Any:
        """The instantiated value of ``key`` in the config of the running subcommand."""
        config = self.config_init
        return (config[self.subcommand] if self.subcommand else config).get(key, default)

    @override
    def before_instantiate_classes(self) -> None:
        config = self._sub_config()
        self._check_init_from(config)
        self._check_devices(config)

    @staticmethod
    def _check_init_from(config: Any) -> None:
        init_args = getattr(config.get("model"), "init_args", None)
        path = init_args.get("init_from") if init_args is not None and hasattr(init_args, "get") else None
        if not path or Path(path).exists():
            return
        recipe = recipe_writing(str(path))
        fix = (
            f"train the float model first: `{PROG} fit --config {recipe}` (it writes {path}), or pass "
            "--model.init_from PATH_TO_A_FLOAT_CHECKPOINT"
            if recipe
            else "pass --model.init_from PATH_TO_A_FLOAT_CHECKPOINT"
        )
        raise RecipeError(f"--model.init_from {path!r}: no such file. Fix: {fix}")

    @staticmethod
    def _check_devices(config: Any) -> None:
        trainer = config.get("trainer")
        if trainer is None or torch.cuda.is_available() or torch.backends.mps.is_available():
            return
        accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
        precision, strategy = str(trainer.get("precision")), trainer.get("strategy")
        wants_all = str(devices) == "-1"
        explicit_gpu = isinstance(accelerator, str) and accelerator in ("gpu", "cuda")
        if not (explicit_gpu or (accelerator == "auto" and wants_all)):
            return
        asked = [f"accelerator: {accelerator}", f"devices: {devices}"]
        fix = ["--trainer.accelerator cpu", "--trainer.devices 1"]
        if precision.startswith("16"):
            asked.append(f"precision: {precision}")
            fix.append("--trainer.precision bf16-mixed")
        if isinstance(strategy, str) and strategy.startswith("ddp"):
            asked.append(f"strategy: {strategy}")
            fix.append("--trainer.strategy auto")
        raise RecipeError(
            f"this recipe {'uses all GPUs' if wants_all else 'needs a GPU'} ({', '.join(asked)}) and this "
            "machine has no GPU (CUDA). "
            f"On CPU pass `{' '.join(fix)}`"
        )

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the class's own error in "Does not validate ..."
            root = first_user_error(err)
            if root is None or isinstance(root, RecipeError):
                raise
            setting = setting_of(root, self._sub_config())
            raise RecipeError(f"{setting + ': ' if setting else ''}{root}") from err

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # An absent optional callback section is None: leave it out of the Trainer's callbacks.
        extra = [c for c in (self._setting(k) for k in CALLBACK_SECTIONS) if c is not None]
        extra.append(SaveOnSigterm())
        trainer_config = {**self._setting("trainer", default={}), **kwargs}
        trainer: pl.Trainer = _compat.instantiate_cli_trainer(self, trainer_config, extra)
        if not trainer.loggers:  # LearningRateMonitor refuses a Trainer without a logger
            # Trainer.callbacks is set at run time (its callback connector), so Lightning's stubs lack it.
            callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
            if any(isinstance(c, LearningRateMonitor) for c in callbacks):
                trainer.callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]  # type: ignore[attr-defined]
                rank_zero_info("lightning-ste: no logger, so the recipe's LearningRateMonitor is left out")
        return trainer

    @override
    def around_subcommand(self, subcommand: str, run: Callable[[], None]) -> None:
        choice = self._sub_config().get("compile", False)
        compiled = choice not in (False, None, "false", "False")
        if compiled:
            # The network's forward only (traced at its first call, after the callbacks converted the model):
            # the steps' logging and metrics stay eager instead of breaking the graph.
            backend = "inductor" if choice in (True, "true", "True") else str(choice)
            self.model.forward = torch.compile(self.model.forward, backend=backend)
        try:
            run()
        except SIGTERMException:
            raise
        except Exception as err:
            root = first_user_error(err)
            if root is None or isinstance(root, RecipeError):
                raise
            raise RecipeError(str(root)) from err
        finally:
            if compiled:
                del self.model.forward  # back to the class's forward

    def after_fit(self) -> None:  # LightningCLI's after_<subcommand> hook
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


@contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` as ``<this program> ARGV`` while LightningCLI reads it (it warns when given ``args`` as
    well as a command line); ``sys.argv[0]`` is kept, Lightning's DDP launcher starts the workers with it."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else PROG, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningSTECLI | None:
    """Run ``lightning-ste`` with ``args`` (default: the command line) and return the CLI object (None for
    ``figure`` and ``recipes``); for tests and scripts. User errors raise :class:`RecipeError`."""
    argv = [a for a in (sys.argv[1:] if args is None else args) if a != "--debug"]
    if argv and argv[0] == "figure":
        from lightning_ste.recipes import figures

        figures.main(argv[1:])
        return None
    if argv and argv[0] == "recipes":
        print(format_recipes())
        return None
    if ensure_wandb_does_not_prompt():
        print(
            "lightning-ste: no W&B credentials found, W&B runs offline (WANDB_MODE=offline)", file=sys.stderr
        )
    wants_help = any(a in ("-h", "--help") for a in argv)
    try:
        with _argv(argv):
            return LightningSTECLI(
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=SaveConfigToLoggers,
                save_config_kwargs={"save_to_log_dir": False},
                parser_kwargs={"default_env": False, "exit_on_error": False},
                args=None,
                run=run,
            )
    except SystemExit as done:
        if wants_help and not done.code:
            print(f"\n{format_recipes()}\n\nAlso: {PROG} recipes (this list), {PROG} figure NAME --out PATH")
        raise
    finally:
        finish_wandb()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-ste``: ``fit|validate|test|predict --config RECIPE.yaml [--a.b value ...]``,
    ``recipes`` or ``figure NAME --out PATH``. A user error prints one short message and exits with status 2
    (``--debug`` or ``LIGHTNING_STE_DEBUG=1``: the traceback); SIGTERM exits with 143 after saving a checkpoint."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        run_cli(argv)
    except SIGTERMException:
        path = take_saved_checkpoint()
        resume = (
            f"; resume with the same command plus --ckpt_path {path}" if path else " (no checkpoint saved)"
        )
        print(f"{PROG}: stopped by SIGTERM{resume}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as err:
        if debug:
            raise
        shown = first_user_error(err)
        if shown is None:
            raise
        print(one_screen(shown), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
