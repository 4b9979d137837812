"""How ``lightning-ste`` reports a user error: one short message naming the setting, the value and the fix, and
exit status 2. A user error is one a setting fixes (:func:`first_user_error`); anything else keeps its
traceback."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_ste import _compat

__all__ = [
    "CALLBACK_SECTIONS",
    "DEBUG_ENV",
    "EXIT_USER_ERROR",
    "PROG",
    "RecipeError",
    "first_user_error",
    "one_screen",
    "setting_of",
    "unknown_key_hint",
]

PROG = "lightning-ste"
DEBUG_ENV = "LIGHTNING_STE_DEBUG"
EXIT_USER_ERROR = 2
# The CLI's class sections a setting can belong to; the last three are callbacks handed to the Trainer.
CALLBACK_SECTIONS = ("activations", "weights", "checkpoint")
_SECTIONS = ("model", "data", *CALLBACK_SECTIONS)


class RecipeError(ValueError):
    """A user error of the ``lightning-ste`` command: the message names the setting, the value and the fix."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
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


def first_user_error(exc: BaseException) -> BaseException | None:
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


def setting_of(exc: BaseException, config: Any) -> str | None:
    """``--section.arg`` for an error raised while building a section's class, when the message names ``arg``."""
    cls = _constructed_class(exc)
    if cls is None or config is None:
        return None
    for section in _SECTIONS:
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


def unknown_key_hint(message: str, parser: Any) -> str:
    """Close matches of the options named as not accepted in a jsonargparse message."""
    keys = sorted(_compat.parser_option_names(parser))
    hints = []
    named = re.findall(r"(?:option|key)s? '([^']+)'", message)
    if "unrecognized arguments" in message:
        named += re.findall(r"--([\w.]+)", message.split("unrecognized arguments", 1)[1])
    for bad in named:
        close = difflib.get_close_matches(bad.lstrip("-"), keys, n=3, cutoff=0.6)
        if close:
            hints.append(f"did you mean {', '.join('--' + c for c in close)}?")
    return " ".join(hints)


def one_screen(err: BaseException) -> str:
    """``err`` as ``lightning-ste: error: ...`` in at most 8 lines, then how to see the traceback."""
    message = str(err).strip()
    lines = message.splitlines() or [type(err).__name__]
    if len(lines) > 8:
        lines = [*lines[:8], "..."]
    return "\n".join(
        [f"{PROG}: error: {lines[0]}", *lines[1:], f"(the full traceback: add --debug or set {DEBUG_ENV}=1)"]
    )
