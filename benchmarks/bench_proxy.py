"""Counted proxy benchmark of the CUDA code path, run on the CPU: kernel launches and bytes moved.

Nothing here times anything. Every aten op dispatched is counted with a ``TorchDispatchMode`` (on CUDA each is
at least one kernel launch; views and allocations are none), and its bytes are those of its tensor inputs and
outputs (each tensor once). The Triton kernels of the quantized ReLU run under the Triton interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, and each launch of them is counted with the bytes of its tensor
arguments. The weight path runs on ``meta`` tensors, which take exactly the branches a CUDA tensor takes (no
fused CPU kernel, no host read of the skip flag).

Prints, per quantized ReLU site (forward + backward, B/element), per weight layer and step, and for a whole
ResNet-18 step at 224x224, then a projected H100 throughput ratio W1A4 / float (a projection from the counts
and the stated bandwidth and launch assumptions, not a measurement).

    python benchmarks/bench_proxy.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed copy
# Before torch/triton import: the Triton kernels are built for the interpreter; no C++ kernels on the CPU.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["LIGHTNING_STE_KERNELS"] = "eager"

import argparse  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from lightning_ste.blend import bcgd_blend_, blend_, grads_finite  # noqa: E402
from lightning_ste.functional import quantize_weight, quantized_relu_unchecked  # noqa: E402
from lightning_ste.quantizers.weight import WeightQuantizer, prepare_weights_  # noqa: E402

# Ops that launch nothing: allocation and metadata only (views are found with OpOverload.is_view).
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
    "_unsafe_view", "set_", "resize_", "zeros_like_meta",
}  # fmt: skip
_TRITON_OPS = "lightning_ste_triton"  # custom ops whose Triton launches are counted inside


@dataclass
class Tally:
    launches: int = 0
    bytes: int = 0
    ops: list[str] = field(default_factory=list)

    def add(self, name: str, tensors: list[Tensor], launches: int = 1) -> None:
        seen: set[int] = set()
        total = 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        self.launches += launches
        self.bytes += total
        self.ops.append(name)


class Count(TorchDispatchMode):
    """Launches and bytes of every aten op dispatched inside (see the module docstring)."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        namespace = func.namespace
        if namespace == _TRITON_OPS or func.is_view or name in _NO_LAUNCH:
            return out
        tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, Tensor)]
        self.tally.add(name, tensors, _foreach_launches(name, args) if name.startswith("_foreach_") else 1)
        return out


# CUDA multi_tensor_apply: chunks of 65536 elements; one launch holds at most this many tensors / chunks,
# by the number of tensor lists it walks (ATen's depth_to_max_tensors / depth_to_max_blocks).
_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MAX_BLOCKS = {1: 320, 2: 320, 3: 320, 4: 320, 5: 320}
_CHUNK = 65536


def _foreach_launches(name: str, args: Any) -> int:
    """Kernel launches of a foreach op on CUDA: per tensor when its lists' shapes differ (the slow path),
    else multi_tensor_apply's launches over the chunks (+1 for the final reduction of ``_foreach_norm``)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor)]
    if not lists:
        return 1
    if any(a[i].shape != lists[0][i].shape for a in lists[1:] for i in range(len(lists[0]))):
        return len(lists[0])
    depth = len(lists) + (0 if name.endswith("_") or name == "_foreach_norm" else 1)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        tensors += 1
        for _ in range(max(1, math.ceil(t.numel() / _CHUNK))):
            blocks += 1
            if blocks == _MAX_BLOCKS[depth] or tensors == _MAX_TENSORS[depth]:
                launches, tensors, blocks = launches + 1, 0, 0
    launches += 1 if blocks or tensors else 0
    return launches + (1 if name == "_foreach_norm" else 0)


def _wrap_triton(tally: Tally) -> Callable[[], None]:
    """Count every launch of the Triton kernels (bytes: their tensor arguments); returns the undo. They are
    wrapped where they are launched: :mod:`lightning_ste.kernels.triton_ops` looks them up in its globals."""
    from lightning_ste.kernels import triton_ops

    names = [n for n in dir(triton_ops) if n.startswith("qrelu_") and n.endswith("_kernel")]
    originals = {n: getattr(triton_ops, n) for n in names}

    class Launcher:
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            def launch(*args: Any, **kwargs: Any) -> Any:
                tally.add(
                    f"triton:{self.name}", [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
                )
                return self.kernel[grid](*args, **kwargs)

            return launch

    for n, k in originals.items():
        setattr(triton_ops, n, Launcher(n, k))

    def undo() -> None:
        for n, k in originals.items():
            setattr(triton_ops, n, k)

    return undo


def relu_site(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tally, Tally]:
    """(forward, backward) tallies of one ReLU site: "relu", "eager" or "triton" quantized ReLU (4 bits)."""
    x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    alpha = nn.Parameter(torch.tensor(0.1946))
    g = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    os.environ["LIGHTNING_STE_KERNELS"] = "triton" if kind == "triton" else "eager"
    fwd, bwd = Tally(), Tally()
    undo = _wrap_triton(fwd) if kind == "triton" else (lambda: None)
    try:
        with Count(fwd):
            # what a QuantReLU module calls (its arguments were checked once, at construction)
            y = (
                torch.relu(x)
                if kind == "relu"
                else quantized_relu_unchecked(x, alpha, 4, "clipped_relu", "mean", 0.01, "ceil")
            )
    finally:
        undo()
    undo = _wrap_triton(bwd) if kind == "triton" else (lambda: None)
    try:
        with Count(bwd):
            y.backward(g)
    finally:
        undo()
        os.environ["LIGHTNING_STE_KERNELS"] = "eager"
    return fwd, bwd


# ResNet-18 weight shapes (torchvision): conv1, 16 3x3 convs in 4 stages, 3 downsample 1x1 convs, fc.
def resnet18_weight_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout, cout, 3, 3)]
            if s != 1 or cin != cout:
                shapes.append((cout, cin, 1, 1))
            cin = cout
    return shapes + [(1000, 512)]


def weight_step(shapes: list[tuple[int, ...]], new: bool) -> tuple[Tally, Tally]:
    """(forward q(W) of every layer, blend + skip decision) of one 16-mixed step on the CUDA path (meta
    tensors). ``new``: the blend reuses the forward's q and follows the scaler's flag; else the previous path
    (q recomputed per layer, a per-layer blend, grads_finite over every gradient)."""
    latents = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    biases = [nn.Parameter(torch.empty(s[0], device="meta")) for s in shapes]  # BN/bias params: one per layer
    quantizers = [WeightQuantizer(bits=1) for _ in shapes]
    fwd, step = Tally(), Tally()
    with Count(fwd):
        if new:
            prepare_weights_(zip(quantizers, latents))  # BlendedQuantWeights.on_train_batch_start
            outs = [q(w) for q, w in zip(quantizers, latents)]
        else:  # the previous forward: sign(W) * mean|W| per layer
            outs = [quantize_weight(w, 1) for w in latents]
    for w, b, o in zip(latents, biases, outs):
        w.grad, b.grad = torch.empty_like(o), torch.empty_like(b)
    found_inf = torch.zeros((), device="meta")  # what GradScaler.unscale_ leaves per device
    with Count(step):
        if new:
            bcgd_blend_(list(zip(latents, quantizers)), 1e-5, found_inf == 0)
        else:
            finite = grads_finite([*latents, *biases])
            assert finite is not None
            weight = finite.to(torch.float32) * 1e-5
            for w in latents:
                blend_(w, quantize_weight(w, 1).detach(), weight)
    return fwd, step


def float_resnet18_step(batch: int) -> Tally:
    """Every aten op of a float ResNet-18 training step at 224x224, float16, channels_last, on meta tensors."""
    from torchvision.models import resnet18

    model = resnet18().to(device="meta", dtype=torch.float16, memory_format=torch.channels_last)
    x = torch.empty(batch, 3, 224, 224, device="meta", dtype=torch.float16).to(
        memory_format=torch.channels_last
    )
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    tally = Tally()
    with Count(tally):
        nn.functional.cross_entropy(model(x), y).backward()
    return tally


def relu_elements_per_image() -> int:
    """Elements through the 17 ReLU call sites of ResNet-18 at 224x224, per image."""
    from torchvision.models import resnet18

    model = resnet18().to("meta")
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel()

    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(hook)
    model(torch.empty(1, 3, 224, 224, device="meta"))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 64, 28, 28], help="ReLU site tensor shape")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bandwidth", type=float, default=2.6e12, help="achieved HBM bytes/s (H100 SXM)")
    parser.add_argument("--launch-us", type=float, default=3.0, help="GPU time of one small extra kernel")
    parser.add_argument("--float-img-s", type=float, default=0.0,
                        help="measured float img/s to project from (default: a roofline of the counted bytes)")  # fmt: skip
    args = parser.parse_args()
    shape = tuple(args.shape)
    n = math.prod(shape)

    print(f"## Per quantized ReLU site, forward + backward (4 bits, clipped_relu, learned alpha; {shape})\n")
    print("| path | dtype | launches fwd + bwd | bytes/element fwd + bwd | x torch.relu bytes |")
    print("|---|---|---|---|---|")
    site: dict[tuple[str, torch.dtype], tuple[int, float]] = {}
    for dtype in (torch.float32, torch.float16):
        for kind in ("relu", "eager", "triton"):
            try:
                f, b = relu_site(kind, shape, dtype)
            except Exception as err:  # e.g. no Triton here
                print(f"| {kind} | {dtype} | not run: {type(err).__name__}: {err} | | |")
                continue
            site[(kind, dtype)] = (f.launches + b.launches, (f.bytes + b.bytes) / n)
            ratio = site[(kind, dtype)][1] / site[("relu", dtype)][1]
            label = {
                "relu": "torch.relu",
                "eager": "quantized_relu, eager formula",
                "triton": "quantized_relu, Triton",
            }[kind]
            print(
                f"| {label} | {str(dtype)[6:]} | {f.launches} + {b.launches} = {f.launches + b.launches} | "
                f"{f.bytes / n:.2f} + {b.bytes / n:.2f} = {(f.bytes + b.bytes) / n:.2f} | {ratio:.2f} |"
            )
            print(f"<!-- {kind} {dtype} fwd ops: {f.ops} bwd ops: {b.ops} -->")

    shapes = resnet18_weight_shapes()
    print("\n## Weight path per step, 16-mixed, binary weights (BCGD), CUDA code path\n")
    print(
        "| path | layers | forward q(W) launches | blend + skip launches | launches / layer | MB moved / step |"
    )
    print("|---|---|---|---|---|---|")
    weights: dict[bool, tuple[int, int]] = {}
    for new in (False, True):
        for layers in (shapes[:2], shapes[:8], shapes):
            f, s = weight_step(layers, new)
            name = "this release" if new else "previous"
            print(
                f"| {name} | {len(layers)} | {f.launches} | {s.launches} | {(f.launches + s.launches) / len(layers):.2f}"
                f" | {(f.bytes + s.bytes) / 1e6:.1f} |"
            )
            if layers is shapes:
                weights[new] = (f.launches + s.launches, f.bytes + s.bytes)
    print("| float layer | any | 0 | 0 | 0 | 0 |")

    # ----------------------------------------------------------------------------------------- projection
    elements = relu_elements_per_image()
    fl = float_resnet18_step(1)
    print(
        f"\n## Projection: ResNet-18 224x224, batch {args.batch}, 16-mixed, H100 (a projection, not a measurement)\n"
    )
    b_float = fl.bytes * args.batch
    t_float = args.batch / args.float_img_s if args.float_img_s else b_float / args.bandwidth
    source = (
        f"measured {args.float_img_s:.0f} img/s"
        if args.float_img_s
        else f"{fl.bytes / 1e6:.1f} MB/image counted x {args.batch} / {args.bandwidth / 1e12:.2f} TB/s (memory-bound roofline)"
    )
    print(f"- float step: {fl.launches} launches, {source}: T_float = {t_float * 1e3:.2f} ms")
    relu_launches, relu_bytes = site[("relu", torch.float16)]
    for kind in ("eager", "triton"):
        if (kind, torch.float16) not in site:
            continue
        launches, per_elem = site[(kind, torch.float16)]
        extra_bytes = (per_elem - relu_bytes) * elements * args.batch + weights[kind == "triton"][1]
        extra_launches = 17 * (launches - relu_launches) + weights[kind == "triton"][0]
        t_extra = extra_bytes / args.bandwidth + extra_launches * args.launch_us * 1e-6
        ratio = t_float / (t_float + t_extra)
        weight_label = "this release" if kind == "triton" else "previous"
        print(
            f"- W1A4 with the {kind} ReLU and the {weight_label} weight path: extra bytes = "
            f"({per_elem:.2f} - {relu_bytes:.2f}) B x {elements:,} elements x {args.batch} + "
            f"{weights[kind == 'triton'][1] / 1e6:.1f} MB weights = {extra_bytes / 1e9:.3f} GB -> "
            f"{extra_bytes / args.bandwidth * 1e3:.2f} ms; extra launches = 17 x ({launches} - {relu_launches}) + "
            f"{weights[kind == 'triton'][0]} = {extra_launches} x {args.launch_us:g} us = "
            f"{extra_launches * args.launch_us * 1e-3:.2f} ms; ratio = {t_float * 1e3:.2f} / "
            f"({t_float * 1e3:.2f} + {t_extra * 1e3:.2f}) = **{ratio:.3f}**"
        )


if __name__ == "__main__":
    main()
