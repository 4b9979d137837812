"""The Triton kernels of the quantized ReLU against the eager formula and the float64 oracle, bit for bit.

Without a GPU they run in the Triton interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set only while
this module imports :mod:`lightning_ste.kernels.triton_relu` (the interpreter is chosen when the kernels
are decorated, so the rest of the session is unaffected). On a GPU machine,
``LIGHTNING_STE_TRITON_DEVICE=cuda python -m pytest tests/test_triton.py`` runs the same checks on CUDA.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import reference as ref
import torch
from fixtures import outputs_and_grads, recording_backend

from lightning_ste.functional import quantized_relu
from lightning_ste.kernels import backend

DEVICE = os.environ.get("LIGHTNING_STE_TRITON_DEVICE", "cpu")


def _import_kernels():
    if DEVICE == "cpu" and "lightning_ste.kernels.triton_relu" not in sys.modules:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            return backend.triton_module()
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    return backend.triton_module()


tk = _import_kernels()
pytestmark = [
    pytest.mark.skipif(
        tk is None
        or (DEVICE == "cuda" and not torch.cuda.is_available())
        or tk.INTERPRETED != (DEVICE == "cpu"),
        reason=f"Triton kernels cannot run on {DEVICE} here",
    ),
    # the interpreter computes with numpy, which warns on inf - inf, 0 * inf and overflow, as IEEE has it
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
# On CUDA, torch.clamp may turn -0.0 into 0.0; the interpreter run also compares the sign of zeros.
SIGNED_ZERO = DEVICE == "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STES = ref.STES
ALPHA_GRADS = ref.ALPHA_GRADS
NAN, INF = float("nan"), float("inf")


def _inputs(alpha: float, bits: int, dtype: torch.dtype, seed: int, n: int = 600) -> torch.Tensor:
    """Random values over every region, each level k*alpha exactly and one float32 step either side of it,
    half levels, signed zeros, tiny and huge values, NaN and +-inf; in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    levels = 2**bits - 1
    a = torch.tensor(alpha)
    k = torch.arange(-1, levels + 2, dtype=torch.float32)
    if k.numel() > 40:  # 8 bits: every level would dominate the small tensor; keep both ends and a sample
        k = torch.cat([k[:8], k[torch.randperm(k.numel() - 16, generator=gen)[:16] + 8], k[-8:]])
    on = k * a
    boundary = torch.cat(
        [on, torch.nextafter(on, torch.tensor(INF)), torch.nextafter(on, torch.tensor(-INF)), (k + 0.5) * a]
    )
    special = torch.tensor(
        [0.0, -0.0, 1e-39, -1e-39, 3e-5, 1e-30, -1e-30, 1e30, -1e30, 3e38, NAN, INF, -INF, NAN]
    )
    x = (torch.rand(n, generator=gen) * 1.4 - 0.2) * levels * alpha
    x = torch.cat([x, boundary, special])
    return x[torch.randperm(x.numel(), generator=gen)].to(dtype)


def _grads(shape: torch.Size, dtype: torch.dtype, seed: int, special: bool = False) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if special:
        flat = g.view(-1)
        flat[:3] = torch.tensor([NAN, INF, -INF])
    return g.to(dtype)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x padded and viewed as [N, C, H, W] (4-dim), channels_last when asked."""
    n = x.numel()
    pad = (-n) % 30
    x = torch.cat([x, x[:pad]]).view(-1, 3, 2, 5)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _run(x, alpha, bits, ste, alpha_grad, rounding, backend_name, g, monkeypatch, want=(True, True)):
    """y, grad_x, grad_alpha of quantized_relu with LIGHTNING_STE_KERNELS=backend_name."""
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", backend_name)
    xi = x.detach().clone().to(DEVICE).requires_grad_(want[0])
    a = torch.tensor(alpha, device=DEVICE, requires_grad=want[1])
    assert backend.backend_for(xi, ste) == backend_name
    y = quantized_relu(xi, a, bits, ste=ste, alpha_grad=alpha_grad, alpha_lr_scale=0.01, rounding=rounding)
    y.backward(g.to(DEVICE))
    monkeypatch.delenv("LIGHTNING_STE_KERNELS")
    return y.detach().cpu(), (xi.grad.cpu() if want[0] else None), (a.grad.cpu() if want[1] else None)


def _decode(code: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(4, dtype=torch.uint8) * 2
    return ((code.cpu()[:, None] >> shifts[None, :]) & 3).reshape(-1)[:n]


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in the order they lie in memory."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(*order).reshape(-1)


def test_forward_and_region_code_every_bits_rounding_dtype_layout() -> None:
    """y and the packed region code against the oracle and the eager formula, bits 1..8, both roundings,
    float32/float16/bfloat16, contiguous and channels_last (the output keeps the input's memory format)."""
    for bits, rounding, dtype, channels_last in itertools.product(
        range(1, 9), ("ceil", "nearest"), DTYPES, (False, True)
    ):
        alpha = (0.75, 0.6511, 0.33, 0.1946, 0.1, 0.05, 0.0237, 0.0125)[bits - 1]
        x = _layout(_inputs(alpha, bits, dtype, seed=bits, n=120), channels_last).to(DEVICE)
        y, code = tk.relu_forward(x, torch.tensor(alpha, device=DEVICE), 2**bits - 1, rounding == "nearest")
        what = f"bits={bits} {rounding} {dtype} channels_last={channels_last}"
        assert y.stride() == x.stride(), what
        ref.assert_same_bits(y.cpu(), ref.forward(x.cpu(), alpha, bits, rounding), SIGNED_ZERO, what)
        with torch.no_grad(), pytest.MonkeyPatch.context() as env:
            env.setenv("LIGHTNING_STE_KERNELS", "eager")  # the torch formula on the same device
            eager = quantized_relu(x, torch.tensor(alpha, device=DEVICE), bits, rounding=rounding)
        ref.assert_same_bits(y.cpu(), eager.cpu(), SIGNED_ZERO, what)
        assert code.numel() == (x.numel() + 3) // 4 and code.dtype == torch.uint8
        expected = _memory_order(ref.region(x.cpu(), alpha, bits))
        assert torch.equal(_decode(code, x.numel()), expected), what


def test_backward_every_ste_alpha_grad_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """y, grad_x and grad_alpha through autograd: Triton == eager bit for bit (y, grad_x), both == the oracle,
    grad_alpha to float32 summation; every STE x alpha_grad x dtype, bits/rounding/layout varied along."""
    cases = list(itertools.product(STES, ALPHA_GRADS, DTYPES))
    for i, (ste, alpha_grad, dtype) in enumerate(cases):
        bits = 1 + i % 8
        rounding = ("ceil", "nearest")[i % 2]
        channels_last = (i // 2) % 2 == 1
        alpha = (0.75, 0.6511, 0.33, 0.1946, 0.1, 0.05, 0.0237, 0.0125)[bits - 1]
        x = _inputs(alpha, bits, dtype, seed=100 + i, n=90)
        if alpha_grad == "ae":  # sum(grad * y) is non-finite as soon as one y is +-inf: keep it finite
            x = x[x.isfinite()]
        x = _layout(x, channels_last)
        g = _grads(x.shape, dtype, seed=i, special=i % 5 == 0)
        what = f"{ste} {alpha_grad} {dtype} bits={bits} {rounding} channels_last={channels_last}"
        yt, gxt, gat = _run(x, alpha, bits, ste, alpha_grad, rounding, "triton", g, monkeypatch)
        ye, gxe, gae = _run(x, alpha, bits, ste, alpha_grad, rounding, "eager", g, monkeypatch)
        ref.assert_same_bits(yt, ye, SIGNED_ZERO, "y " + what)
        ref.assert_same_bits(gxt, gxe, SIGNED_ZERO, "grad_x " + what)
        ref.assert_same_bits(yt, ref.forward(x, alpha, bits, rounding), SIGNED_ZERO, "y/oracle " + what)
        ref.assert_same_bits(gxt, ref.grad_x(x, g, alpha, bits, ste), SIGNED_ZERO, "grad_x/oracle " + what)
        terms = ref.alpha_terms(x, g, alpha, bits, alpha_grad, rounding)
        ref.assert_close_alpha(gat, terms, 0.01)
        ref.assert_close_alpha(gae, terms, 0.01)
        assert gat.dtype == torch.float32


def test_alpha_gradient_reduced_over_many_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks looped over fewer programs than blocks, every program's partial sums added by the last one,
    and the counter left at zero for the next launch (two launches in a row agree with the oracle)."""
    monkeypatch.setattr(tk, "BLOCK", 64)
    monkeypatch.setattr(tk, "MAX_PROGRAMS", 3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1000, generator=gen) * 2  # 16 blocks of 64 over 3 programs
    for alpha_grad in ("mean", "ae"):
        g = torch.randn(1000, generator=gen)
        for _ in range(2):
            _, gx, ga = _run(x, 0.3, 3, "clipped_relu", alpha_grad, "ceil", "triton", g, monkeypatch)
            ref.assert_close_alpha(ga, ref.alpha_terms(x, g, 0.3, 3, alpha_grad), 0.01, rtol=1e-6)
            ref.assert_same_bits(gx, ref.grad_x(x, g, 0.3, 3, "clipped_relu"), SIGNED_ZERO, alpha_grad)
        assert int(tk._counter(torch.device(DEVICE))) == 0


def test_alpha_below_the_floor_and_nan_alpha(monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha is clamped to 1e-3 on the device (no host read); a NaN alpha gives NaN levels, as eagerly."""
    x = _inputs(0.001, 4, torch.float32, seed=9, n=60)
    g = _grads(x.shape, torch.float32, seed=9)
    for alpha in (1e-4, NAN):
        for ste, alpha_grad in (("clipped_relu", "mean"), ("log_tailed_relu", "ae")):
            monkeypatch.setenv("LIGHTNING_STE_KERNELS", "triton")
            xi = x.clone().to(DEVICE).requires_grad_(True)
            a = torch.tensor(alpha, device=DEVICE, requires_grad=True)
            y = quantized_relu(xi, a, 4, ste=ste, alpha_grad=alpha_grad) if alpha == alpha else None
            if y is None:  # quantized_relu refuses a NaN alpha on the CPU: call the kernels themselves
                y, code = tk.relu_forward(xi.detach(), a, 15, False)
                ref.assert_same_bits(y.cpu(), ref.forward(x, alpha, 4), SIGNED_ZERO, "NaN alpha")
                assert torch.equal(_decode(code, x.numel()), ref.region(x, alpha, 4))
                continue
            y.backward(g.to(DEVICE))
            what = f"alpha={alpha} {ste}"
            ref.assert_same_bits(y.detach().cpu(), ref.forward(x, alpha, 4), SIGNED_ZERO, what)
            ref.assert_same_bits(xi.grad.cpu(), ref.grad_x(x, g, alpha, 4, ste), SIGNED_ZERO, what)
            ref.assert_close_alpha(a.grad.cpu(), ref.alpha_terms(x, g, alpha, 4, alpha_grad), 0.01)


def test_sliced_empty_and_zero_dim_inputs_and_expanded_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-dense input (made contiguous first), an expanded (stride-0) gradient, 0 elements and 0 dims."""
    base = torch.randn(6, 8, 10, generator=torch.Generator().manual_seed(4)) * 2
    inputs = [
        base[:, ::2, 1:],
        base.transpose(0, 2),
        torch.empty(0, 3),
        torch.tensor(0.7),
        torch.tensor(-0.1),
    ]
    for x in inputs:
        g = torch.ones(()).expand(x.shape)
        for alpha_grad in ("mean", "ae"):
            y, gx, ga = _run(x, 0.3, 3, "relu", alpha_grad, "nearest", "triton", g, monkeypatch)
            what = f"shape {tuple(x.shape)} strides {x.stride()} {alpha_grad}"
            ref.assert_same_bits(y, ref.forward(x, 0.3, 3, "nearest"), SIGNED_ZERO, what)
            ref.assert_same_bits(gx, ref.grad_x(x, g, 0.3, 3, "relu"), SIGNED_ZERO, what)
            ref.assert_close_alpha(ga, ref.alpha_terms(x, g, 0.3, 3, alpha_grad, "nearest"), 0.01, what=what)


def test_only_the_needed_outputs_and_saved_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved for backward: a 2-bit code (n/4 bytes) and the 0-dim alpha; y only for "ae"; x only for the
    input-dependent log-tailed proxy; nothing per element for identity without an alpha gradient."""
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "triton")
    x = torch.randn(4, 3, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)

    def saved(ste: str, alpha_grad: str, alpha_requires_grad: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        xi = x.clone().requires_grad_(True)
        a = torch.tensor(0.2, device=DEVICE, requires_grad=alpha_requires_grad)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            y = quantized_relu(xi, a, 4, ste=ste, alpha_grad=alpha_grad)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(torch.ones_like(y))
        assert xi.grad.is_contiguous(memory_format=torch.channels_last)
        return [t for t in out if t.dim() > 0]

    n = x.numel()
    assert [(t.dtype, t.numel()) for t in saved("clipped_relu", "mean", True)] == [
        (torch.uint8, (n + 3) // 4)
    ]
    assert sorted((str(t.dtype), t.numel()) for t in saved("relu", "ae", True)) == sorted(
        [("torch.uint8", (n + 3) // 4), ("torch.float32", n)]
    )
    assert [(t.dtype, t.numel()) for t in saved("log_tailed_relu", "mean", True)] == [(torch.float32, n)]
    assert saved("identity", "mean", False) == []


def test_named_triton_backend_raises_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "triton")
    x = torch.randn(8, device=DEVICE)
    assert backend.backend_for(x) == "triton" and backend.backend_for(x, "log_tailed_relu") == "triton"
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        backend.backend_for(x.double())
    with pytest.raises(RuntimeError, match="Triton kernels run on CUDA tensors"):
        backend.backend_for(torch.empty(3, device="meta"))
    from lightning_ste.quantizers import ste as ste_registry

    monkeypatch.setitem(
        ste_registry._REGISTRY, "test_soft", ste_registry.STE("test_soft", lambda x, t: x, None, True)
    )
    with pytest.raises(RuntimeError, match="arbitrary Python proxy"):
        quantized_relu(x, torch.tensor(0.2, device=DEVICE), 4, ste="test_soft")
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "auto")
    assert backend.backend_for(x, "test_soft") == "eager"
    # auto never picks the interpreter for a CPU tensor
    assert backend.backend_for(torch.randn(8)) in ("cpu", "eager")


def test_torch_compile_traces_the_custom_ops_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """fullgraph=True (a graph break raises); the forward and backward graphs call the Triton ops; same
    values as the uncompiled Triton path."""
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "triton")
    graphs: list[str] = []

    def f(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return quantized_relu(x, a, 4, alpha_grad="mean")

    torch._dynamo.reset()
    x = torch.randn(4, 300, device=DEVICE) * 2
    g = torch.randn(4, 300, device=DEVICE)
    results = outputs_and_grads(
        (f, torch.compile(f, backend=recording_backend(graphs), fullgraph=True)), x, g, 0.1946
    )
    assert len(graphs) == 2
    assert (
        "lightning_ste_triton.qrelu_forward" in graphs[0]
        and "lightning_ste_triton.qrelu_backward" in graphs[1]
    )
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])
    torch._dynamo.reset()


_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightning_ste.kernels import triton_relu as T

target = GPUTarget("cuda", 90, 32)
options = {"num_warps": T.NUM_WARPS, "enable_fp_fusion": False}
fused_multiply_add = []
for dt, nearest in (("fp32", False), ("fp16", True), ("bf16", True)):
    sig = {"x_ptr": "*" + dt, "alpha_ptr": "*fp32", "y_ptr": "*" + dt, "code_ptr": "*u8", "n": "i32",
           "levels": "fp32", "alpha_floor": "fp32", "NEAREST": "constexpr", "WANT_CODE": "constexpr",
           "OUT_BF16": "constexpr", "BLOCK": "constexpr"}
    const = {"NEAREST": nearest, "WANT_CODE": True, "OUT_BF16": dt == "bf16", "BLOCK": T.BLOCK}
    ptx = triton.compile(ASTSource(T.qrelu_fwd_kernel, sig, constexprs=const), target=target, options=options).asm["ptx"]
    assert "div.rn.f32" in ptx, "forward: IEEE division expected"
    fused_multiply_add += ["fma" in ptx]
for dt, (from_x, gx, alpha) in zip(("fp32", "fp16", "bf16", "bf16", "fp16"), ((0, 1, 1), (0, 0, 2), (1, 2, 1), (1, 0, 2), (0, 1, 0))):
    sig = {"g_ptr": "*" + dt, "src_ptr": "*" + (dt if from_x else "u8"), "y_ptr": "*" + dt, "alpha_ptr": "*fp32",
           "gx_ptr": "*" + dt, "partial_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": "*fp32", "n": "i32",
           "levels": "fp32", "alpha_floor": "fp32", "m0": "fp32", "m1": "fp32", "m2": "fp32", "w_in": "fp32",
           "w_above": "fp32", "scale": "fp32", "FROM_X": "constexpr", "GX": "constexpr", "ALPHA": "constexpr",
           "OUT_BF16": "constexpr", "BLOCK": "constexpr", "RBLOCK": "constexpr"}
    const = {"FROM_X": bool(from_x), "GX": gx, "ALPHA": alpha, "OUT_BF16": dt == "bf16", "BLOCK": T.BLOCK,
             "RBLOCK": 1024}
    ptx = triton.compile(ASTSource(T.qrelu_bwd_kernel, sig, constexprs=const), target=target, options=options).asm["ptx"]
    assert ("atom" in ptx) == (alpha != 0), "backward: the last-program counter is an atomic"
    fused_multiply_add += ["fma" in ptx]
assert not any(fused_multiply_add), "a fused multiply-add would round differently from torch"
print("compiled", len(fused_multiply_add))
"""


def test_kernels_compile_for_a_gpu_without_one(tmp_path) -> None:
    """The GPU lowering (Triton -> PTX -> cubin for sm_90, with the ptxas that ships with Triton) accepts
    the kernels (each dtype, rounding and backward variant at least once): IEEE division, no fused
    multiply-add. Runs in a subprocess: this session's
    kernels are built for the interpreter."""
    import importlib.util
    import subprocess
    from pathlib import Path

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 8" in done.stdout
