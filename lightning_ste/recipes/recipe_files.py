"""The YAML recipe files under ``recipes/``: where they are, their listing, and the shared base each one names.

A recipe names its base with a ``config:`` key (jsonargparse's own "read this config file first"), e.g.
``config: ../_base/cifar10.yaml``. jsonargparse merges the rest of a file onto what was parsed *before* that
file, so an ``init_args``-only override (``trainer.logger.init_args.name``) or a list append
(``trainer.callbacks+``) would not see the base it names; :func:`with_bases` therefore also passes the bases
as earlier ``--config`` files. Base files live in folders starting with ``_`` and are not recipes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from lightning_ste.recipes.errors import PROG

__all__ = ["base_chain", "format_recipes", "list_recipes", "recipe_writing", "recipes_dir", "with_bases"]

_CONFIG_OPTIONS = ("--config", "-c")


def recipes_dir() -> Path | None:
    """``./recipes`` when it exists, else the ``recipes/`` of the source tree this package was imported from
    (a checkout; an installed wheel ships no YAML, so there it is ``./recipes`` or nothing)."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if candidate.is_dir() and any(candidate.rglob("*.yaml")):
            return candidate
    return None


def _recipe_paths(root: Path) -> Iterator[Path]:
    """The recipe files under ``root``, sorted; base files (under a folder starting with ``_``) left out."""
    for path in sorted(root.rglob("*.yaml")):
        if not any(part.startswith("_") for part in path.relative_to(root).parts[:-1]):
            yield path


def _shown(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """``(path, description)`` of every recipe YAML under ``root`` (default: see :func:`recipes_dir`); the
    description is the recipe's first comment line."""
    root = root or recipes_dir()
    if root is None:
        return []
    out = []
    for path in _recipe_paths(root):
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


def _load(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def recipe_writing(checkpoint: str) -> str | None:
    """The recipe whose ``checkpoint.dirpath`` is the folder of ``checkpoint`` (the run that writes it)."""
    root = recipes_dir()
    if root is None:
        return None
    folder = Path(checkpoint).parent.as_posix().rstrip("/")
    for path in _recipe_paths(root):
        dirpath = str((_load(path).get("checkpoint") or {}).get("dirpath", "")).rstrip("/")
        if dirpath and Path(dirpath).as_posix() == folder:
            return _shown(path)
    return None


def base_chain(path: Path) -> list[Path]:
    """The base files ``path`` names through ``config:`` keys, the outermost first (``path`` not included)."""
    chain: list[Path] = []
    seen, current = {path.resolve()}, path
    while isinstance(base := _load(current).get("config"), str):
        current = current.parent / base
        if current.resolve() in seen or not current.is_file():
            break  # a cycle or a missing file: jsonargparse reports it when it reads the key
        seen.add(current.resolve())
        chain.insert(0, current)
    return chain


def with_bases(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config BASE`` before each ``--config RECIPE`` for every base the recipe names."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in _CONFIG_OPTIONS and i + 1 < len(argv):
            value, taken = argv[i + 1], [arg, argv[i + 1]]
        elif arg.startswith("--config="):
            value, taken = arg.split("=", 1)[1], [arg]
        else:
            taken = [arg]
        if value is not None and Path(value).is_file():
            for base in base_chain(Path(value)):
                out += ["--config", str(base)]
        out += taken
        i += len(taken)
    return out
