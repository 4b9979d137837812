"""Build the fused CPU kernels from scratch in N processes at once and check that exactly one builds.

Each process imports the package from this checkout, calls ``cpu_kernels.available()`` (which builds on first
use) and runs one quantized ReLU through the kernels. A fresh temporary TORCH_EXTENSIONS_DIR makes the build
real (about a minute of one core). Prints each process's exit code, seconds, and how many printed the
"building" log line; exits 1 unless every process succeeded and exactly one built.

    python benchmarks/check_kernel_build.py --procs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import time, torch
t0 = time.perf_counter()
from lightning_ste.kernels import cpu as cpu_kernels
from lightning_ste.functional import quantized_relu
assert cpu_kernels.available(), "kernels not built"
x = torch.randn(4, 8, 5, 5, requires_grad=True)
y = quantized_relu(x, torch.tensor(0.25), bits=2, ste="clipped_relu")
y.sum().backward()
assert torch.equal(y, (x / 0.25).ceil().clamp(0, 3) * 0.25)
print(f"seconds {time.perf_counter() - t0:.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=root, PYTHONPATH=str(_REPO))
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD],
                cwd=_REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.procs)
        ]
        results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate()]]
        wall = time.perf_counter() - start
    builders = 0
    for i, (rc, out, err) in enumerate(results):
        built = "lightning_ste: building" in err
        builders += built
        print(f"process {i}: exit {rc}, {out.strip() or '-'}, printed the build line: {built}")
        if rc != 0:
            print(err[-2000:])
    ok = all(rc == 0 for rc, _, _ in results) and builders == 1
    print(f"{args.procs} processes, {builders} built, wall {wall:.1f} s: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
