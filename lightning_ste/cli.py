"""``lightning-ste``: the LightningCLI entry point of the recipes (fit/validate/test/predict), ``recipes`` and
``figure``.

Recipes are YAML files under ``recipes/``; any ``--section.key value`` overrides them. Besides ``model``,
``data`` and ``trainer``, the CLI has three callback sections: ``activations`` and ``weights`` (optional:
the quantization callbacks, e.g. ``lightning_ste.callbacks.activations.QuantizeActivations``) and
``checkpoint`` (a ``ModelCheckpoint``), so ``--activations.ste relu`` overrides the STE of a recipe, and
``--compile true`` (or a backend name) runs ``torch.compile`` on the model. A user error (a rejected setting, a
missing file, a GPU recipe on a CPU-only machine, an unknown key) is one short message and exit status 2;
``--debug`` or ``LIGHTNING_STE_DEBUG=1`` shows the full traceback. On SIGTERM a checkpoint is saved before
the run stops (:class:`SaveOnSigterm`).
"""

from __future__ import annotations

import argparse
import difflib
import netrc
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

__all__ = [
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

PROG = "lightning-ste"
DEBUG_ENV = "LIGHTNING_STE_DEBUG"
EXIT_USER_ERROR = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process stopped by SIGTERM


class RecipeError(ValueError):
    """A user error of the ``lightning-ste`` command: the message names the setting, the value and the fix."""


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


# ----------------------------------------------------------------------------------------------- recipes


def _recipes_dir() -> Path | None:
    """``./recipes`` when it exists, else the ``recipes/`` of the source tree this package was installed from."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[1] / "recipes"):
        if candidate.is_dir() and any(candidate.rglob("*.yaml")):
            return candidate
    return None


def _shown(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """``(path, description)`` of every recipe YAML under ``root`` (default: see :func:`_recipes_dir`); the
    description is the recipe's first comment line."""
    root = root or _recipes_dir()
    if root is None:
        return []
    out = []
    for path in sorted(root.rglob("*.yaml")):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        out.append((_shown(path), first.lstrip("#").strip()))
    return out


def format_recipes(width: int | None = None) -> str:
    """The recipe listing of ``lightning-ste recipes`` and ``--help``: one line per recipe."""
    recipes = list_recipes()
    if not recipes:
        return (
            "Recipes: none found (they are the YAML files under recipes/ of the lightning-ste source tree; "
            "run from the checkout)."
        )
    width = width or max(100, shutil.get_terminal_size((120, 24)).columns)
    name_width = max(len(p) for p, _ in recipes)
    room = max(60, width - name_width - 4)
    lines = [f"Recipes ({PROG} fit --config RECIPE [--section.key value ...]):"]
    for path, text in recipes:
        lines.append(f"  {path:<{name_width}}  {text if len(text) <= room else text[: room - 3] + '...'}")
    return "\n".join(lines)


def _recipe_writing(checkpoint: str) -> str | None:
    """The recipe whose ``checkpoint.dirpath`` is the folder of ``checkpoint`` (the run that writes it)."""
    root = _recipes_dir()
    if root is None:
        return None
    folder = Path(checkpoint).parent.as_posix().rstrip("/")
    for path in sorted(root.rglob("*.yaml")):
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        dirpath = str((config.get("checkpoint") or {}).get("dirpath", "")).rstrip("/")
        if dirpath and Path(dirpath).as_posix() == folder:
            return _shown(path)
    return None


# ----------------------------------------------------------------------------------------------- SIGTERM


_PREEMPTION: dict[str, str] = {}  # the checkpoint SaveOnSigterm wrote in this process, for main's last words


class SaveOnSigterm(Callback):
    """Save a checkpoint when the process gets SIGTERM (what SLURM and Kubernetes send before they kill a job).

    Lightning turns SIGTERM into a stop after the current training batch (``trainer.received_sigterm``); this
    callback first writes the state at the end of that batch, like a step checkpoint of ``ModelCheckpoint``,
    to ``<dirpath>/last.ckpt`` (``dirpath`` defaults to the trainer's ModelCheckpoint folder, else its
    ``default_root_dir``), so ``fit --ckpt_path <dirpath>/last.ckpt`` resumes from that step. In DDP the ranks
    agree on the decision (one all-reduce of a flag per step).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: str | None = None

    def _path(self, trainer: pl.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        folder = self.dirpath or (getattr(ckpt, "dirpath", None) if ckpt is not None else None)
        return os.path.join(folder or trainer.default_root_dir, self.filename)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = trainer.received_sigterm
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or self.saved_path is not None:
            return
        path = self._path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = _PREEMPTION["checkpoint"] = path
        rank_zero_info(
            f"SIGTERM received: saved {path} (step {trainer.global_step}); the run stops after this batch. "
            f"Resume with the same command plus --ckpt_path {path}"
        )


# ----------------------------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _raised_in_package(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "lightning_ste" in Path(last.tb_frame.f_code.co_filename).parts


def _is_user_error(exc: BaseException) -> bool:
    """Errors a user fixes with a setting: ours, jsonargparse's, Lightning's configuration errors, and the
    ValueError/FileNotFoundError/ImportError the package raises about its arguments and data."""
    if isinstance(exc, (RecipeError, argparse.ArgumentError, MisconfigurationException)):
        return True
    return isinstance(exc, (ValueError, FileNotFoundError, ImportError, TypeError)) and _raised_in_package(
        exc
    )


def _first_user_error(exc: BaseException) -> BaseException | None:
    """The outermost user error in ``exc``'s chain (jsonargparse wraps the class's own error, for one)."""
    return next((e for e in _chain(exc) if _is_user_error(e)), None)


def _constructed_class(exc: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``exc`` (the outermost such frame of its traceback)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _class_path(value: Any) -> str:
    return str(getattr(value, "class_path", "") or "") if value is not None else ""


def _setting_of(exc: BaseException, config: Any) -> str | None:
    """``--section.arg`` for an error raised while building a section's class, when the message names ``arg``."""
    cls = _constructed_class(exc)
    if cls is None or config is None:
        return None
    for section in ("model", "data", "activations", "weights", "checkpoint"):
        value = config.get(section) if hasattr(config, "get") else None
        path = _class_path(value) or (
            "lightning.pytorch.callbacks.ModelCheckpoint" if section == "checkpoint" else ""
        )
        if path.rsplit(".", 1)[-1] != cls:
            continue
        init_args = getattr(value, "init_args", value)
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", str(exc))
        for name in names:
            if init_args is not None and hasattr(init_args, "get") and name in init_args:
                return f"--{section}.{name} ({cls})"
        return f"the `{section}` section ({cls})"
    return None


def _unknown_key_hint(message: str, parser: Any) -> str:
    """Close matches of the options named as not accepted in a jsonargparse message."""
    keys: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        keys.update(o[2:] for o in getattr(p, "_option_string_actions", {}) if o.startswith("--"))
        action = getattr(p, "_subcommands_action", None)
        if action is not None:
            stack.extend(action.choices.values())
    hints = []
    named = re.findall(r"(?:option|key)s? '([^']+)'", message)
    if "unrecognized arguments" in message:
        named += re.findall(r"--([\w.]+)", message.split("unrecognized arguments", 1)[1])
    for bad in named:
        close = difflib.get_close_matches(bad.lstrip("-"), sorted(keys), n=3, cutoff=0.6)
        if close:
            hints.append(f"did you mean {', '.join('--' + c for c in close)}?")
    return " ".join(hints)


# ----------------------------------------------------------------------------------------------- the CLI


class LightningSTECLI(LightningCLI):
    """LightningCLI with the quantization callback sections, ``--compile``, SIGTERM checkpoints, one-screen user
    errors (:class:`RecipeError`) and a final table of the validation metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Callback, "activations", subclass_mode=True, required=False)
        parser.add_lightning_class_args(Callback, "weights", subclass_mode=True, required=False)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--compile",
            type=bool | str,
            default=False,
            help="torch.compile the model's forward: true (inductor) or a backend name; false: eager",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            message = str(err).strip()
            hint = _unknown_key_hint(message, parser)
            sub = next((a for a in (args or sys.argv[1:]) if a in self.subcommands()), None)
            more = f" (all settings: {PROG} {sub} --help)" if sub else f" (see {PROG} --help)"
            raise RecipeError(f"{message}{'; ' + hint if hint else ''}{more}") from err

    def _sub_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

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
        recipe = _recipe_writing(str(path))
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

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the class's own error in "Does not validate ..."
            root = _first_user_error(err)
            if root is None or isinstance(root, RecipeError):
                raise
            setting = _setting_of(root, self._sub_config())
            raise RecipeError(f"{setting + ': ' if setting else ''}{root}") from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # An absent optional callback section is None: leave it out of the Trainer's callbacks.
        keys = self._parser(self.subcommand).callback_keys
        extra = [c for c in (self._get(self.config_init, k) for k in keys) if c is not None]
        extra.append(SaveOnSigterm())
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        trainer = self._instantiate_trainer(trainer_config, extra)
        if not trainer.loggers:  # LearningRateMonitor refuses a Trainer without a logger
            dropped = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
            if dropped:
                trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
                rank_zero_info("lightning-ste: no logger, so the recipe's LearningRateMonitor is left out")
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        choice = self._get(self.config, "compile", default=False)
        compiled = choice not in (False, None, "false", "False")
        if compiled:
            # The network's forward only (traced at its first call, after the callbacks converted the model):
            # the steps' logging and metrics stay eager instead of breaking the graph.
            backend = "inductor" if choice in (True, "true", "True") else str(choice)
            self.model.forward = torch.compile(self.model.forward, backend=backend)
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise
        except Exception as err:
            root = _first_user_error(err)
            if root is None or isinstance(root, RecipeError):
                raise
            raise RecipeError(str(root)) from err
        finally:
            if compiled:
                del self.model.forward  # back to the class's forward

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
        from lightning_ste import figures

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
                save_config_callback=_SaveConfigToLoggers,
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
        _finish_wandb()


def _one_screen(err: BaseException) -> str:
    message = str(err).strip()
    lines = message.splitlines() or [type(err).__name__]
    if len(lines) > 8:
        lines = [*lines[:8], "..."]
    return "\n".join(
        [f"{PROG}: error: {lines[0]}", *lines[1:], f"(the full traceback: add --debug or set {DEBUG_ENV}=1)"]
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-ste``: ``fit|validate|test|predict --config RECIPE.yaml [--a.b value ...]``,
    ``recipes`` or ``figure NAME --out PATH``. A user error prints one short message and exits with status 2
    (``--debug`` or ``LIGHTNING_STE_DEBUG=1``: the traceback); SIGTERM exits with 143 after saving a checkpoint."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        run_cli(argv)
    except SIGTERMException:
        path = _PREEMPTION.pop("checkpoint", None)
        resume = (
            f"; resume with the same command plus --ckpt_path {path}" if path else " (no checkpoint saved)"
        )
        print(f"{PROG}: stopped by SIGTERM{resume}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as err:
        if debug:
            raise
        shown = _first_user_error(err)
        if shown is None:
            raise
        print(_one_screen(shown), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
