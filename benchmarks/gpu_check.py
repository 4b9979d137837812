"""The steps of ``benchmarks/gpu_check.sh``, one subcommand each; every result row is appended to
``$OUT/results.md`` (and printed) the moment it is measured, so a run cut short keeps what it measured.

    python3 benchmarks/gpu_check.py env|exact|relu|fit|profile [--dry-run]

``--dry-run`` runs the same code on the CPU with tiny sizes (Triton in its interpreter) so the script's logic
is exercised without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or REPO / "gpu_check_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def row(text: str) -> None:
    """Print ``text`` and append it to $OUT/results.md at once (flushed: a later timeout keeps it)."""
    print(text, flush=True)
    with open(out_dir() / "results.md", "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def device(dry: bool) -> Any:
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------- steps


def step_env(dry: bool) -> None:
    import torch

    import lightning_ste

    where = Path(lightning_ste.__file__).resolve()
    if REPO not in where.parents:
        raise SystemExit(f"lightning_ste imported from {where}, not from the checkout {REPO}")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (dry run)"
    row(f"- python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {name}")
    row(f"- lightning_ste from {where.parent}")
    try:
        import triton

        row(f"- triton {triton.__version__}")
    except Exception as err:
        row(f"- triton does not import: {type(err).__name__}: {err}")


def _same(u: Any, v: Any) -> bool:
    """Bit-identical, NaN where NaN (and the sign of zero)."""
    import torch

    if u.shape != v.shape or u.dtype != v.dtype:
        return False
    return torch.equal(u.isnan(), v.isnan()) and torch.equal(
        u.nan_to_num().view(torch.int16 if u.element_size() == 2 else torch.int32)
        if u.dtype != torch.float64
        else u.nan_to_num(),
        v.nan_to_num().view(torch.int16 if v.element_size() == 2 else torch.int32)
        if v.dtype != torch.float64
        else v.nan_to_num(),
    )


def step_exact(dry: bool) -> int:
    """Triton against the eager formula on the same device tensors: y, grad_x and grad_alpha bit for bit,
    over bits 1-8, every built-in STE, every alpha_grad, both roundings, three dtypes, contiguous and
    channels_last, values on and next to the level boundaries, NaN and +-inf. On CUDA the eager formula's
    division is IEEE-rounded; a Triton kernel that divides approximately shows up here."""
    import torch

    from lightning_ste.functional import quantized_relu

    dev = device(dry)
    torch.manual_seed(0)
    alpha = 0.1946
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30])
    bounds = torch.arange(-2, 260) * alpha  # every level boundary k*alpha (in float32) and its neighbours
    base = torch.cat(
        [
            special,
            bounds,
            torch.nextafter(bounds, bounds + 1),
            torch.nextafter(bounds, bounds - 1),
            torch.randn(2000) * 2,
        ]
    )
    per = 4 * 6 * 6
    x0 = base[: (2 if dry else base.numel() // per) * per].reshape(-1, 4, 6, 6)
    bits_list = (1, 2, 4, 8) if dry else tuple(range(1, 9))
    stes = ("identity", "relu", "clipped_relu", "log_tailed_relu")
    modes = ("ae", "mean", "min", "pact")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cases = list(itertools.product(dtypes, bits_list, stes, modes, ("ceil", "nearest"), (False, True)))
    if dry:
        cases = cases[:: max(1, len(cases) // 12)]

    def run(backend: str, xd: Any, bits: int, ste: str, mode: str, rounding: str) -> tuple[Any, Any, Any]:
        os.environ["LIGHTNING_STE_KERNELS"] = backend
        xi = xd.detach().clone().requires_grad_(True)
        a = torch.tensor(alpha, device=dev, requires_grad=True)
        y = quantized_relu(xi, a, bits=bits, ste=ste, alpha_grad=mode, rounding=rounding)
        g = torch.linspace(-1, 1, xd.numel(), device=dev).reshape(xd.shape).to(xd.dtype)
        y.backward(torch.empty_like(xd).copy_(g))  # the gradient in x's memory format
        return y.detach(), xi.grad, a.grad

    bad: list[str] = []
    alpha_off: list[float] = []
    start = time.perf_counter()
    for dtype, bits, ste, mode, rounding, cl in cases:
        xd = x0.to(device=dev, dtype=dtype)
        if cl:
            xd = xd.contiguous(memory_format=torch.channels_last)
        t = run("triton", xd, bits, ste, mode, rounding)
        e = run("eager", xd, bits, ste, mode, rounding)
        ok_y, ok_gx, ok_a = _same(t[0], e[0]), _same(t[1], e[1]), _same(t[2], e[2])
        kept = t[0].is_contiguous(memory_format=torch.channels_last) == cl or not cl
        if not ok_a and torch.isfinite(e[2]):
            alpha_off.append(float((t[2] - e[2]).abs() / e[2].abs().clamp_min(1e-30)))
        if not (ok_y and ok_gx and ok_a and kept):
            bad.append(
                f"{str(dtype)[6:]} bits={bits} ste={ste} alpha_grad={mode} {rounding} "
                f"{'channels_last' if cl else 'contiguous'}: y {ok_y} grad_x {ok_gx} grad_alpha {ok_a} layout {kept}"
            )
    os.environ["LIGHTNING_STE_KERNELS"] = "auto"
    seconds = time.perf_counter() - start
    row(
        f"| Triton vs eager on {dev.type}, bit for bit | {len(cases) - len(bad)}/{len(cases)} cases identical "
        f"(y, grad_x, grad_alpha, layout) | {seconds:.0f} s |"
    )
    if alpha_off:
        row(
            f"|   grad_alpha differs in {len(alpha_off)} cases | max relative difference {max(alpha_off):.2e} | |"
        )
    with open(out_dir() / "exact_mismatches.txt", "w") as f:
        f.write("\n".join(bad) + "\n")
    for b in bad[:15]:
        print("  MISMATCH", b)
    return 1 if bad else 0


def step_relu(dry: bool) -> None:
    """One ReLU site forward + backward (float16, channels_last): torch.relu, eager formula, Triton."""
    import torch

    from lightning_ste.functional import quantized_relu

    dev = device(dry)
    shape = (2, 8, 8, 8) if dry else (256, 64, 56, 56)
    x = torch.randn(shape, device=dev, dtype=torch.float16 if not dry else torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn_like(x)
    alpha = torch.tensor(0.1946, device=dev, requires_grad=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    reps = 2 if dry else 50
    base = None
    for name, backend in (
        ("torch.relu", None),
        ("quantized_relu eager", "eager"),
        ("quantized_relu Triton", "triton"),
    ):
        if backend:
            os.environ["LIGHTNING_STE_KERNELS"] = backend

        def once() -> None:
            y = torch.relu(x) if backend is None else quantized_relu(x, alpha, bits=4, ste="clipped_relu")  # noqa: B023
            y.backward(g)

        try:
            for _ in range(2):
                once()
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                once()
            sync()
        except Exception as err:
            row(f"| ReLU site {tuple(shape)} fwd+bwd | {name} | not run: {type(err).__name__}: {err} |")
            continue
        ms = (time.perf_counter() - t0) / reps * 1e3
        base = base or ms
        row(f"| ReLU site {tuple(shape)} fwd+bwd | {name} | {ms:.3f} ms ({ms / base:.2f}x torch.relu) |")
    os.environ["LIGHTNING_STE_KERNELS"] = "auto"


def step_fit(dry: bool, config: str, seconds: float, batch: int, size: int) -> None:
    """A Lightning fit of the ImageNet recipe model (Classifier resnet18, channels_last, 16-mixed, cuDNN
    benchmark) on generated data for ``seconds``: img/s after the warm-up and max_memory_allocated."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_ste import BlendedQuantWeights, QuantizeActivations
    from lightning_ste.recipes.models import Classifier

    dev = device(dry)
    torch.manual_seed(0)
    classes = 1000

    class Generated(IterableDataset):
        """One generated batch, already on the device, served again and again (no input pipeline cost)."""

        def __init__(self) -> None:
            self.x = torch.randn(batch, 3, size, size, device=dev).contiguous(
                memory_format=torch.channels_last
            )
            self.y = torch.randint(0, classes, (batch,), device=dev)

        def __iter__(self):  # type: ignore[no-untyped-def]
            while True:
                yield self.x, self.y

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.warmup, self.steps, self.t0, self.start = (2 if dry else 15), 0, 0.0, time.perf_counter()

        def _sync(self) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            self.steps += 1
            if self.steps == self.warmup:
                self._sync()
                self.t0 = time.perf_counter()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            if time.perf_counter() - self.start > seconds and self.steps > self.warmup:
                trainer.should_stop = True

    callbacks: list[L.Callback] = []
    if config in ("A4", "W1A4"):
        callbacks.append(QuantizeActivations(bits=4))
    if config == "W1A4":
        callbacks.append(BlendedQuantWeights(bits=1, rho=1e-5))
    clock = Clock()
    model = Classifier(
        arch="resnet18", num_classes=classes, lr=0.01, momentum=0.95, weight_decay=1e-4, channels_last=True
    )
    precision = "bf16-mixed" if dry else "16-mixed"
    trainer = L.Trainer(
        accelerator=dev.type, devices=1, precision=precision, benchmark=not dry,
        max_steps=10**6, callbacks=[*callbacks, clock], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, DataLoader(Generated(), batch_size=None))
    clock._sync()
    timed = clock.steps - clock.warmup
    img_s = timed * batch / (time.perf_counter() - clock.t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    backend = "-"
    if config != "float":
        from lightning_ste.kernels import backend_for

        backend = backend_for(torch.empty(1, device=dev, dtype=torch.float16 if not dry else torch.float32))
    row(
        f"| Lightning fit {config} | {size}x{size}, batch {batch}, {precision}, channels_last, ReLU backend {backend} | "
        f"{img_s:.0f} img/s over {timed} steps | max_memory_allocated {mem:.2f} GiB |"
    )


def step_profile(dry: bool, batch: int, size: int) -> None:
    """torch.profiler top-10 kernels of A4 training steps (autocast float16, channels_last) into $OUT."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torchvision.models import resnet18

    from lightning_ste import quantize_activations_

    dev = device(dry)
    model = resnet18().to(dev).to(memory_format=torch.channels_last)
    quantize_activations_(model, bits=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(1 if dry else 5):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(1 if dry else 3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=10)
    (out_dir() / "profile_A4.txt").write_text(table)
    row(f"| torch.profiler A4, 3 steps | top-10 kernels by {key} | in profile_A4.txt |")
    print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("env", "exact", "relu", "fit", "profile"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the logic only")
    parser.add_argument("--config", default="float", choices=("float", "A4", "W1A4"))
    parser.add_argument("--seconds", type=float, default=35.0)
    args = parser.parse_args()
    dry = args.dry_run
    batch, size = (4, 32) if dry else (256, 224)
    if args.step == "env":
        step_env(dry)
    elif args.step == "exact":
        return step_exact(dry)
    elif args.step == "relu":
        step_relu(dry)
    elif args.step == "fit":
        step_fit(dry, args.config, args.seconds, batch, size)
    else:
        step_profile(dry, batch, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
