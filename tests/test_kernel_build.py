"""The CPU kernels' build cache: one build directory per environment, one builder at a time."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from lightning_ste.kernels import cpu as cpu_kernels


def test_build_name_is_keyed_by_environment() -> None:
    here = cpu_kernels.environment_key()
    assert cpu_kernels.build_name() == cpu_kernels.build_name(here)
    # Another interpreter prefix with the same torch version must not share (and rebuild) this build.
    other = here.replace(os.sep, os.sep + "other-venv" + os.sep, 1)
    assert other != here
    assert cpu_kernels.build_name(other) != cpu_kernels.build_name(here)


def _stand_in_build(artifact: str, log: str) -> str:
    # A build that takes a while and leaves `artifact`; it records each time it really builds.
    if not os.path.exists(artifact):
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(artifact, "w") as f:
            f.write("built")
    with open(artifact) as f:
        return f.read()


def _child(directory: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    artifact, log = os.path.join(directory, "ext.so"), os.path.join(directory, "builds.log")
    barrier.wait()  # both processes reach build_once together
    got = cpu_kernels.build_once(directory, artifact, lambda: _stand_in_build(artifact, log), "the stand-in")
    results.put(got)


def test_concurrent_builders_wait_for_one_build(tmp_path: Path) -> None:
    # What this proves: build_once's lock makes two processes that need the build at the same moment run it
    # one after the other, so the second finds the first's artifact and does not build again. (The real
    # cpp_extension build under two processes is checked by benchmarks/check_kernel_build.py.)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == ["built", "built"]
    assert len((tmp_path / "builds.log").read_text().split()) == 1


def test_first_build_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    artifact, log = str(tmp_path / "ext.so"), str(tmp_path / "builds.log")
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        for _ in range(2):
            cpu_kernels.build_once(
                str(tmp_path), artifact, lambda: _stand_in_build(artifact, log), "the stand-in"
            )
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "building the stand-in" in lines[0] and str(tmp_path) in lines[0], lines
