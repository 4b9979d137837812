"""benchmarks/gpu_check.py, the steps of gpu_check.sh, run here in its CPU dry-run mode: it must import the
package from this checkout and append each row to $OUT/results.md as it is measured."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
# Not imported here: Triton must be imported with TRITON_INTERPRET=1 in the process that uses it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _step(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # the script itself must put the checkout first
    return subprocess.run(
        [sys.executable, str(_REPO / "benchmarks" / "gpu_check.py"), *args, "--dry-run"],
        cwd=tmp_path,  # not the repository root: an installed copy would win without the script's own path
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_gpu_check_env_and_exact_steps_write_rows_to_out(tmp_path: Path) -> None:
    env = _step(tmp_path, "env")
    assert env.returncode == 0, env.stderr[-2000:]
    exact = _step(tmp_path, "exact")
    assert exact.returncode == 0, exact.stdout[-2000:] + exact.stderr[-2000:]
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert f"- lightning_ste from {_REPO / 'lightning_ste'}" in rows
    (exact_row,) = [r for r in rows if r.startswith("| Triton vs eager on cpu")]
    done, total = exact_row.split("| ")[2].split(" cases")[0].split("/")
    assert done == total and int(total) >= 12, exact_row
    assert (tmp_path / "exact_mismatches.txt").read_text().strip() == ""
