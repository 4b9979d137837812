"""ResNet-18 training step: full precision vs quantized (ours, Brevitas, torch.ao), one table.

Every configuration is built once and kept alive; the timed rounds then interleave them (fp32, A4, W1A4, ...
fp32, A4, ...) in the same process, so machine noise hits all of them alike. The step-time ratio of a
configuration is taken against the fp32 time of the same round; the table gives min/median/max over rounds.

Columns: ms/step (median), step-time ratio to fp32 (min/median/max), bytes autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``, unique storages, one forward) and their ratio to fp32, and the
peak resident memory a training step adds on top of what the process held before it (Linux: VmHWM after
resetting it through ``/proc/self/clear_refs``).

CPU (default): 64x64 images, batch 32, float32. CUDA (``--device cuda``): 224x224, batch 256, float16 autocast
with a GradScaler (Lightning's ``16-mixed``), channels_last.

    python benchmarks/bench_resnet18.py                 # CPU table
    python benchmarks/bench_resnet18.py --device cuda   # CUDA table
    python benchmarks/bench_resnet18.py --only fp32,A4,W1A4 --rounds 9
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lightning_ste
from lightning_ste.blend import bcgd_blend_
from lightning_ste.inspect import quantized_layers
from lightning_ste.surgery.activation_plan import quantize_activations_
from lightning_ste.surgery.weight_params import quantize_weights_

CONFIGS = (
    "fp32",
    "A4",
    "W1A4",
    "fp32 compiled",
    "A4 compiled",
    "W1A4 compiled",
    "brevitas A4",
    "brevitas W1A4",
    "torch.ao A4",
    "torch.ao W2A4",
)
RHO = 1e-5  # BCGD19 default blend factor


class Skip(Exception):
    """A configuration that cannot run here (missing optional package); the message says why."""


@dataclass
class Row:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_backward: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    saved_bytes: int | None = None
    step_rss_mib: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------------------- models


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=1000)


def _replace_relus(model: nn.Module, factory: Callable[[], nn.Module]) -> int:
    """Swap every ``nn.ReLU`` module for ``factory()`` (a torchvision BasicBlock calls its one ReLU twice)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, factory())
                count += 1
    return count


def _quantize_weights(model: nn.Module, bits: int) -> Callable[[], None]:
    """Binary weights (every conv and linear layer) and the BCGD19 blend to run before each optimizer step,
    as ``BlendedQuantWeights`` does it (the quantizer's own blend: one fused pass for binary CPU weights)."""
    quantize_weights_(model, bits=bits)
    layers = [(weight, quantizer) for _, _, weight, quantizer in quantized_layers(model)]
    return lambda: bcgd_blend_(layers, RHO)


def _brevitas(model: nn.Module, weight_bits: int | None) -> None:
    try:
        import brevitas.nn as qnn
        from brevitas.quant import SignedBinaryWeightPerTensorConst
    except ImportError as err:
        raise Skip(f"brevitas not installed ({err.name}); `pip install brevitas` to add it") from None
    _replace_relus(model, lambda: qnn.QuantReLU(bit_width=4))
    if weight_bits is None:
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                new = qnn.QuantConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    bias=child.bias is not None,
                    weight_quant=SignedBinaryWeightPerTensorConst,
                )
                setattr(parent, name, new)


def _torch_ao(model: nn.Module, weight_bits: int | None) -> None:
    try:
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
    except ImportError as err:
        raise Skip(f"torch.ao.quantization unavailable ({err})") from None

    def act() -> nn.Module:
        return nn.Sequential(
            nn.ReLU(),
            FakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=15, dtype=torch.quint8),
        )

    _replace_relus(model, act)
    if weight_bits is None:
        return
    # torch.ao has no binary weight quantizer; ternary {-1, 0, 1} * scale is the nearest it offers.
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fake = FakeQuantize(
                MovingAverageMinMaxObserver,
                quant_min=-1,
                quant_max=1,
                dtype=torch.qint8,
                qscheme=torch.per_tensor_symmetric,
            )
            torch.nn.utils.parametrize.register_parametrization(module, "weight", fake)


def build(name: str, device: torch.device, channels_last: bool) -> Row:
    torch.manual_seed(0)
    model = _resnet18()
    after_backward = None
    base = name.removesuffix(" compiled")
    if base == "A4":
        quantize_activations_(model, bits=4)
    elif base == "W1A4":
        quantize_activations_(model, bits=4)
        after_backward = _quantize_weights(model, 1)
    elif name == "brevitas A4":
        _brevitas(model, None)
    elif name == "brevitas W1A4":
        _brevitas(model, 1)
    elif name == "torch.ao A4":
        _torch_ao(model, None)
    elif name == "torch.ao W2A4":
        _torch_ao(model, 2)
    elif base != "fp32":
        raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if name.endswith(" compiled"):
        model = torch.compile(model)
    return Row(name, model, optimizer, after_backward)


# -------------------------------------------------------------------------------------------- steps


class Stepper:
    def __init__(self, device: torch.device, amp: bool) -> None:
        self.device, self.amp = device, amp
        self.scaler = torch.amp.GradScaler(device.type) if amp else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, row: Row, x: torch.Tensor, target: torch.Tensor) -> None:
        row.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = F.cross_entropy(row.model(x), target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(row.optimizer)
            # a step the scaler skips must not blend either (docs/math.md §3); timing runs never overflow here
            if row.after_backward is not None:
                row.after_backward()
            self.scaler.step(row.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if row.after_backward is not None:
                row.after_backward()
            row.optimizer.step()

    def timed(self, row: Row, x: torch.Tensor, target: torch.Tensor, steps: int) -> tuple[float, float]:
        """Wall-clock and process CPU seconds per step (CPU time is what a shared machine distorts least)."""
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(row, x, target)
        self._sync()
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def saved_bytes(row: Row, x: torch.Tensor, amp: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            out = row.model(x)
    del out
    return sum(storages.values())


def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _read_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def step_peak_rss_mib(stepper: Stepper, row: Row, x: torch.Tensor, target: torch.Tensor) -> float | None:
    """Peak RSS during one step minus RSS before it (resets the kernel's high-water mark first).

    On CUDA: the peak of ``torch.cuda.max_memory_allocated`` during one step minus the memory held before it.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
        stepper.step(row, x, target)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before_cuda) / 2**20
    if not sys.platform.startswith("linux"):
        return None
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _read_rss_kib()
    stepper.step(row, x, target)
    hwm = _read_hwm_kib()
    return None if hwm is None else (hwm - before) / 1024


# -------------------------------------------------------------------------------------------- table


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _on_cuda(row: Row) -> bool:
    return next(row.model.parameters()).device.type == "cuda"


def _ratios(times: list[float], base: list[float]) -> str:
    r = [t / b for t, b in zip(times, base)]
    return f"{min(r):.3f}/{statistics.median(r):.3f}/{max(r):.3f}"


def render(rows: list[Row], skipped: list[tuple[str, str]], header: str) -> str:
    fp32 = rows[0]
    lines = [header]
    cols = f"{'config':<15} {'ms/step':>8} {'wall ratio min/med/max':>23} {'cpu ratio min/med/max':>22}"
    cols += f" {'saved MiB':>10} {'saved ratio':>11}"
    cols += f" {'step RSS +MiB' if fp32.model.training and not _on_cuda(fp32) else 'step peak MiB':>14}"
    lines.append(cols)
    lines.append("-" * len(cols))
    for row in rows:
        med_ms = statistics.median(row.times) * 1e3
        ratio = _ratios(row.times, fp32.times)
        cpu_ratio = _ratios(row.cpu_times, fp32.cpu_times)
        sratio = (
            "n/a"
            if row.saved_bytes is None or not fp32.saved_bytes
            else f"{row.saved_bytes / fp32.saved_bytes:.3f}"
        )
        rss = "n/a" if row.step_rss_mib is None else f"{row.step_rss_mib:.0f}"
        lines.append(
            f"{row.name:<15} {med_ms:>8.1f} {ratio:>23} {cpu_ratio:>22} {_fmt_bytes(row.saved_bytes):>10} {sratio:>11} {rss:>14}"
            + (f"  {row.note}" if row.note else "")
        )
    for name, reason in skipped:
        lines.append(f"{name:<15} skipped: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--only", default=None, help="comma-separated configurations (fp32 is always first)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--batch", type=int, default=None, help="batch size (CPU 32, CUDA 256)")
    parser.add_argument("--size", type=int, default=None, help="image side (CPU 64, CUDA 224)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    batch = args.batch or (256 if cuda else 32)
    size = args.size or (224 if cuda else 64)
    amp = cuda  # 16-mixed on CUDA; CPU runs in float32
    if cuda:
        torch.backends.cudnn.benchmark = True
    names = (
        list(CONFIGS) if args.only is None else ["fp32"] + [n for n in args.only.split(",") if n != "fp32"]
    )
    if args.skip_compile:
        names = [n for n in names if not n.endswith("compiled")]
    warnings.filterwarnings("ignore")

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    stepper = Stepper(device, amp)

    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        try:
            row = build(name, device, channels_last=cuda)
        except Skip as err:
            skipped.append((name, str(err)))
            continue
        try:
            start = time.perf_counter()
            for _ in range(args.warmup):
                stepper.step(row, x, target)
            warm_s = time.perf_counter() - start
            if name.endswith("compiled"):
                row.note = f"(compile+warmup {warm_s:.0f} s)"
            try:
                row.saved_bytes = saved_bytes(row, x, amp)
            except Exception as err:  # saved-tensor hooks and some compiled graphs do not mix
                row.note += f" saved bytes n/a: {type(err).__name__}"
            row.step_rss_mib = step_peak_rss_mib(stepper, row, x, target)
        except Exception as err:
            skipped.append((name, f"failed: {type(err).__name__}: {err}".splitlines()[0][:100]))
            continue
        rows.append(row)
        print(f"built {name}", file=sys.stderr, flush=True)

    for r in range(args.rounds):
        for row in rows:
            wall, cpu = stepper.timed(row, x, target, args.steps)
            row.times.append(wall)
            row.cpu_times.append(cpu)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    header = (
        f"ResNet-18 training step, {device.type}, batch {batch}, {size}x{size}, "
        f"{'16-mixed, channels_last' if amp else 'float32'}, torch {torch.__version__}, "
        f"lightning_ste {getattr(lightning_ste, '__version__', '?')}, {threads} threads, "
        f"{args.rounds} interleaved rounds x {args.steps} steps"
    )
    table = render(rows, skipped, header)
    print(table)
    if cuda:
        print()
        for row in rows:
            print(f"{row.name:<15} {batch / statistics.median(row.times):8.0f} img/s")
    return table


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
