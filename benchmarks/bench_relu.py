"""Forward + backward of ``lightning_ste.functional.quantized_relu`` against ``torch.relu``, one tensor.

Runs are interleaved (relu, quantized, relu, quantized, ...) and the ratio is taken per round; the median
times and the min/median/max ratio are printed, for wall-clock and for process CPU time.

    python benchmarks/bench_relu.py                       # 32x64x56x56, 4 bits, learned alpha
    python benchmarks/bench_relu.py --shape 8,64,56,56 --bits 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_ste.functional import quantized_relu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--ste", default="clipped_relu")
    parser.add_argument("--alpha-grad", default="mean")
    parser.add_argument("--rounding", default="ceil")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    alpha = torch.tensor(0.1946, device=device, requires_grad=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_relu() -> None:
        torch.relu(x).backward(grad)

    def run_quant() -> None:
        y = quantized_relu(x, alpha, args.bits, args.ste, args.alpha_grad, 0.01, args.rounding)
        y.backward(grad)

    def timed(fn) -> tuple[float, float]:
        x.grad = alpha.grad = None
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    for _ in range(3):
        timed(run_relu)
        timed(run_quant)
    relu_t, quant_t = [], []
    for _ in range(args.rounds):
        relu_t.append(timed(run_relu))
        quant_t.append(timed(run_quant))
    print(
        f"shape {shape} {args.dtype} {device.type}, bits={args.bits}, ste={args.ste}, "
        f"alpha_grad={args.alpha_grad}, rounding={args.rounding}, {torch.get_num_threads()} threads"
    )
    for i, clock in enumerate(("wall", "cpu")):
        r = [t[i] for t in relu_t]
        q = [t[i] for t in quant_t]
        ratios = [b / a for a, b in zip(r, q)]
        print(
            f"{clock:>4}: torch.relu {statistics.median(r) * 1e3:7.2f} ms, quantized_relu "
            f"{statistics.median(q) * 1e3:7.2f} ms (medians); ratio min/median/max "
            f"{min(ratios):.2f}/{statistics.median(ratios):.2f}/{max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
