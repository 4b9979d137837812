"""Reproduce the tables of results/RESULTS.md: one resumable run per cell, in dependency order.

Each cell is one `lightning-ste fit` of a recipe, logged to ``results/<name>.log`` with its checkpoints in
``runs/checkpoints/<name>/``. A run cut by ``--timeout`` (or by the end of a session) is resumed from its
``last.ckpt`` the next time the script runs; a finished run leaves a ``DONE`` marker and is skipped. Cells that
fine-tune from the float LeNet-5 run it first.

    python results/reproduce.py --dry-run                    # print every command, run nothing
    python results/reproduce.py --only 'lenet5_a2_*'         # the A2 cells (and the float model they need)
    python results/reproduce.py --timeout 1800 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = Path("runs/checkpoints")
FLOAT = "lenet5_float_50ep"


@dataclass(frozen=True)
class Cell:
    """One table cell: a recipe, its extra arguments and the cells whose checkpoints it starts from."""

    name: str
    recipe: str
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    mnist: bool = True


def _cells() -> list[Cell]:
    cells = [Cell(FLOAT, "recipes/mnist/lenet5_float.yaml")]
    init = ("--model.init_from", str(CHECKPOINTS / FLOAT / "last.ckpt"))
    for bits in ("a2", "a4"):
        for ste in ("identity", "relu", "clipped_relu"):
            cells.append(
                Cell(
                    f"lenet5_{bits}_{ste}_full",
                    f"recipes/mnist/lenet5_{bits}.yaml",
                    ("--activations.ste", ste, *init),
                    needs=(FLOAT,),
                )
            )
    for ste in ("relu", "clipped_relu", "log_tailed_relu", "identity"):
        cells.append(Cell(f"twolayer_{ste}_full", "recipes/mnist/twolayer.yaml", ("--activations.ste", ste)))
    for ste in ("relu", "identity"):
        cells.append(
            Cell(
                f"orthogonal_subspaces_{ste}",
                "recipes/synthetic/orthogonal_subspaces.yaml",
                ("--activations.ste", ste),
                mnist=False,
            )
        )
    for ste in ("clipped_relu", "relu", "identity"):
        cells.append(
            Cell(
                f"teacher_student_{ste}",
                "recipes/synthetic/teacher_student.yaml",
                ("--activations.ste", ste),
                mnist=False,
            )
        )
    return cells


def command(cell: Cell, data_root: str) -> list[str]:
    """The `lightning-ste fit` command of ``cell``, resuming from its last checkpoint when one is there."""
    ckdir = CHECKPOINTS / cell.name
    cmd = ["lightning-ste", "fit", "--config", cell.recipe]
    if cell.mnist:
        cmd += ["--data.root", data_root]
    cmd += [*cell.args, "--checkpoint.dirpath", str(ckdir), "--trainer.logger.init_args.name", cell.name]
    cmd += ["--trainer.enable_progress_bar", "false"]
    last = REPO / ckdir / "last.ckpt"
    if last.is_file() and not (REPO / ckdir / "DONE").exists():
        cmd += ["--ckpt_path", str(ckdir / "last.ckpt")]
    return cmd


def selected(cells: list[Cell], patterns: list[str] | None) -> list[Cell]:
    """The cells matching any of ``patterns`` (all when None), with the cells they need first."""
    by_name = {c.name: c for c in cells}
    wanted = [c for c in cells if patterns is None or any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    if not wanted:
        names = ", ".join(by_name)
        raise SystemExit(f"--only {patterns} matches no cell; cells: {names}")
    order: list[Cell] = []
    for cell in wanted:
        for need in cell.needs:
            if by_name[need] not in order:
                order.append(by_name[need])
        if cell not in order:
            order.append(cell)
    return order


def run(cell: Cell, data_root: str, timeout: float | None) -> int:
    """Run one piece of ``cell`` (up to ``timeout`` seconds), appending to its log; 0 once it has finished."""
    ckdir = REPO / CHECKPOINTS / cell.name
    if (ckdir / "DONE").exists():
        print(f"{cell.name}: done")
        return 0
    cmd = command(cell, data_root)
    log = REPO / "results" / f"{cell.name}.log"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with log.open("a") as out:
        out.write(f"=== {stamp} start: {shlex.join(cmd)}\n")
        out.flush()
        print(f"{cell.name}: {shlex.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124  # cut: the next invocation resumes from last.ckpt
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.write(f"=== {stamp} exit {rc}\n")
    if rc == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        (ckdir / "DONE").touch()
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="cells to run (globs over the cell names)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per piece; a cut run resumes later"
    )
    parser.add_argument("--data-root", default=os.environ.get("LIGHTNING_STE_MNIST", "../shared/data"))
    parser.add_argument("--list", action="store_true", help="list the cells and their state")
    args = parser.parse_args(argv)
    cells = selected(_cells(), args.only)
    if args.list or args.dry_run:
        for cell in cells:
            done = (REPO / CHECKPOINTS / cell.name / "DONE").exists()
            state = "done" if done else "todo"
            print(f"{cell.name:32s} {state}  {shlex.join(command(cell, args.data_root))}")
        return 0
    failed = []
    for cell in cells:
        if any(not (REPO / CHECKPOINTS / need / "DONE").exists() for need in cell.needs):
            print(f"{cell.name}: skipped, needs {', '.join(cell.needs)} to finish first")
            failed.append(cell.name)
            continue
        if run(cell, args.data_root, args.timeout) != 0:
            failed.append(cell.name)
    if failed:
        print(f"not finished (run again to resume): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
