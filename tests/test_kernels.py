"""The backends of quantized_relu: the eager torch formula and the fused CPU kernels of lightning_ste.kernels.cpu.

Both are checked against the float64 oracle of tests/reference.py (bit for bit for values and grad_x, to
summation order for the alpha gradient), so the eager formula is checked even where the CPU kernels cannot
build. Where they build, the fast path must also agree with the eager one on level boundaries, NaN/inf,
empty, non-contiguous, channels_last and half-precision inputs. The dispatch point
(LIGHTNING_STE_KERNELS) is tested here too; the Triton kernels in test_triton.py.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from fixtures import outputs_and_grads, recording_backend

from lightning_ste import functional as F_ste
from lightning_ste.functional import ALPHA_GRADS, ROUNDINGS, quantize_weight, quantized_relu
from lightning_ste.kernels import backend
from lightning_ste.kernels import cpu as cpu_kernels
from lightning_ste.quantizers import ste as ste_registry
from lightning_ste.quantizers.weight import WeightQuantizer

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="fused CPU kernels could not be built here"
)

REGION_STES = ("identity", "relu", "clipped_relu")


def _run(
    x: torch.Tensor, alpha: float, bits: int, ste: str, alpha_grad: str, rounding: str, fast: bool, g=None
):
    """y, grad_x, grad_alpha and the saved tensors of one call, with the fused kernels on or off."""
    xi = x.detach().clone().requires_grad_(True)
    a = torch.tensor(alpha, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    previous = cpu_kernels._state.get("ok")
    cpu_kernels._state["ok"] = fast
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = quantized_relu(
                xi, a, bits, ste=ste, alpha_grad=alpha_grad, alpha_lr_scale=0.01, rounding=rounding
            )
        y.backward(torch.ones_like(y) if g is None else g)
    finally:
        cpu_kernels._state["ok"] = previous
    return y.detach(), xi.grad, a.grad, saved


def _assert_same(fast, eager, exact_alpha: bool = False) -> None:
    (yf, gxf, gaf, _), (ye, gxe, gae, _) = fast, eager
    assert yf.dtype == ye.dtype and yf.shape == ye.shape
    assert torch.equal(yf.nan_to_num(), ye.nan_to_num()) and torch.equal(yf.isnan(), ye.isnan())
    assert torch.equal(gxf.nan_to_num(), gxe.nan_to_num()) and torch.equal(gxf.isnan(), gxe.isnan())
    if exact_alpha:
        assert torch.equal(gaf, gae)
    else:
        torch.testing.assert_close(gaf, gae, rtol=1e-5, atol=1e-6, equal_nan=True)


def _boundary_input(alpha: float, bits: int, n: int = 5000, seed: int = 0) -> torch.Tensor:
    """Random values over every region plus every level, half level and the top, exactly."""
    gen = torch.Generator().manual_seed(seed)
    levels = 2**bits - 1
    x = (torch.rand(n, generator=gen) * 1.5 - 0.25) * levels * alpha
    a32 = torch.tensor(alpha)
    k = torch.arange(-1, levels + 2, dtype=torch.float32)
    exact = torch.cat([k * a32, (k + 0.5) * a32, torch.nextafter(k * a32, torch.tensor(float("inf")))])
    x = torch.cat([x, exact, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    return x[torch.randperm(x.numel(), generator=gen)]


@needs_kernels
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fast_path_matches_eager_all_settings(bits: int, rounding: str) -> None:
    alpha = 0.1946 if bits != 1 else 0.75
    x = _boundary_input(alpha, bits, seed=bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for ste, mode in itertools.product(REGION_STES, ALPHA_GRADS):
        fast = _run(x, alpha, bits, ste, mode, rounding, True, g)
        eager = _run(x, alpha, bits, ste, mode, rounding, False, g)
        _assert_same(fast, eager)


@needs_kernels
def test_fast_path_is_taken_and_saves_two_bits_per_element() -> None:
    x = torch.randn(64, 1000)
    fast = _run(x, 0.2, 4, "clipped_relu", "mean", "ceil", True)
    eager = _run(x, 0.2, 4, "clipped_relu", "mean", "ceil", False)
    codes_fast = [t for t in fast[3] if t.dtype == torch.uint8]
    codes_eager = [t for t in eager[3] if t.dtype == torch.uint8]
    assert [t.numel() for t in codes_fast] == [2 * x.numel() // 8]
    assert [t.numel() for t in codes_eager] == [x.numel()]
    # every saved tensor but the code is the 0-dim alpha: no copy of the input or the output
    assert all(t.dim() == 0 for t in fast[3] if t.dtype != torch.uint8)


@needs_kernels
def test_packed_code_matches_torch_reference() -> None:
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099):
        x = torch.randn(n) * 2
        a = torch.tensor(0.2)
        y, code = cpu_kernels.relu_forward(x, a, 15, False)
        assert torch.equal(code, cpu_kernels.code_planes(x, a * 15)), n


@needs_kernels
def test_nan_inf_and_signed_zero() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.3, 1e30, -1e30] * 5)
    g = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0, 6.0, float("inf"), 8.0] * 5)
    for ste, mode, rounding in itertools.product(REGION_STES, ("mean", "pact", "ae"), ROUNDINGS):
        fast = _run(x, 0.25, 2, ste, mode, rounding, True, g)
        _assert_same(fast, _run(x, 0.25, 2, ste, mode, rounding, False, g))
        y = fast[0]
        assert y[0].isnan() and y[1] == float("inf") and y[2] == -float("inf")


@needs_kernels
def test_empty_and_zero_dim_inputs() -> None:
    for x in (torch.empty(0, 3), torch.tensor(0.7), torch.tensor(-0.1)):
        _assert_same(
            _run(x, 0.2, 4, "clipped_relu", "mean", "ceil", True),
            _run(x, 0.2, 4, "clipped_relu", "mean", "ceil", False),
        )


@needs_kernels
def test_non_contiguous_and_channels_last_inputs_and_grads() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, 10, 12, generator=gen)
    inputs = {
        "transposed": base.transpose(1, 3),
        "sliced": base[:, ::2, 1:, ::3],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "expanded": torch.randn(1, 8, 10, 1, generator=gen).expand(6, 8, 10, 12),
    }
    for name, x in inputs.items():
        for g in (
            torch.randn(x.shape, generator=gen),
            torch.randn(x.shape, generator=gen).transpose(0, 1).contiguous().transpose(0, 1),
            torch.ones(()).expand(x.shape),
        ):
            fast = _run(x, 0.3, 3, "clipped_relu", "mean", "ceil", True, g)
            _assert_same(fast, _run(x, 0.3, 3, "clipped_relu", "mean", "ceil", False, g))
            assert fast[1].shape == x.shape, name


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype: torch.dtype) -> None:
    x = (_boundary_input(0.1946, 4, n=3000) * 1.1).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    for ste, mode, rounding in itertools.product(REGION_STES, ("mean", "ae"), ROUNDINGS):
        fast = _run(x, 0.1946, 4, ste, mode, rounding, True, g)
        eager = _run(x, 0.1946, 4, ste, mode, rounding, False, g)
        assert fast[0].dtype == dtype and fast[1].dtype == dtype and fast[2].dtype == torch.float32
        _assert_same(fast, eager)


@needs_kernels
def test_bf16_autocast_on_cpu_matches_eager() -> None:
    x = torch.randn(4, 16, 9, 9)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    outs = []
    for fast in (True, False):
        a = torch.tensor(0.1946, requires_grad=True)
        conv.zero_grad()
        previous = cpu_kernels._state.get("ok")
        cpu_kernels._state["ok"] = fast
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = quantized_relu(conv(x), a, 4)
            y.float().square().sum().backward()
        finally:
            cpu_kernels._state["ok"] = previous
        outs.append((y.detach(), conv.weight.grad.clone(), a.grad))
    assert outs[0][0].dtype == torch.bfloat16
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-6)


@needs_kernels
def test_large_input_threads_and_alpha_sum() -> None:
    # Large enough to be split over threads; the alpha gradient sums over all of them.
    x = torch.randn(3, 64, 57, 61) * 2
    g = torch.randn(x.shape)
    fast = _run(x, 0.1946, 4, "clipped_relu", "mean", "ceil", True, g)
    _assert_same(fast, _run(x, 0.1946, 4, "clipped_relu", "mean", "ceil", False, g))


def test_log_tailed_and_registered_proxies_keep_eager_path() -> None:
    """An input-dependent proxy has no CPU kernel: auto runs it eagerly, and its gradient is the oracle's."""
    x = torch.cat([torch.randn(100) * 3, torch.tensor([3.0, 2.9999998, 3.0000002, 0.0, 1e30])])
    assert backend.backend_for(x, "log_tailed_relu") == "eager"
    xi = x.clone().requires_grad_(True)
    g = torch.randn(x.shape)
    quantized_relu(xi, torch.tensor(0.2), 4, ste="log_tailed_relu").backward(g)
    ref.assert_same_bits(xi.grad, ref.grad_x(x, g, 0.2, 4, "log_tailed_relu"), what="log-tailed grad_x")


@needs_kernels
def test_torch_compile_inductor_matches_uncompiled() -> None:
    x = torch.randn(4, 300) * 2
    g = torch.randn(4, 300)

    def f(xi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return quantized_relu(xi, a, 4)

    compiled = torch.compile(f, fullgraph=True)
    results = outputs_and_grads((f, compiled), x, g, 0.1946)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_weight_kernels_match_eager(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    for shape in [(1,), (3, 5), (64, 32, 3, 3), (1000, 513)]:
        w = torch.randn(shape, generator=gen, dtype=dtype)
        w.view(-1)[0] = 0.0
        mean = w.abs().mean()
        torch.testing.assert_close(cpu_kernels.abs_mean(w), mean, rtol=1e-6, atol=0)
        q = cpu_kernels.sign_scale(w, mean)
        assert torch.equal(q, torch.sign(w) * mean)
        torch.testing.assert_close(F_ste.quantize_weight(w, 1), torch.sign(w) * mean, rtol=1e-6, atol=0)
        codes, scale = F_ste.weight_codes(w, 1)
        assert torch.equal(codes, torch.sign(w))
        torch.testing.assert_close(scale, mean, rtol=1e-6, atol=0)
    special = torch.tensor([float("nan"), 0.0, -0.0, 2.0, -3.0, float("inf")], dtype=dtype)
    for w in (special, special[1:5]):
        expected = torch.sign(w) * w.abs().mean()
        got = cpu_kernels.sign_scale(w, cpu_kernels.abs_mean(w))
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


@needs_kernels
def test_binary_weight_gradient_still_straight_through() -> None:
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    g = torch.randn(16, 8, 3, 3)
    F_ste.quantize_weight(w, 1).backward(g)
    assert torch.equal(w.grad, g)
    # non-contiguous weights take the eager path and give the same values
    wt = torch.randn(8, 16).t()
    torch.testing.assert_close(F_ste.quantize_weight(wt, 1), torch.sign(wt) * wt.abs().mean())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_blend_matches_eager_formula(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    for rho in (1e-5, 0.01, 0.5, 1.0):
        w = torch.randn(37, 129, generator=gen, dtype=dtype)
        w[0, :3] = 0.0
        q = torch.sign(w) * cpu_kernels.abs_mean(w)
        expected = w.clone().mul_(1 - rho).add_(q * rho)
        got = cpu_kernels.binary_blend_(w, rho)
        assert got is w
        assert torch.equal(got, expected)


@needs_kernels
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_torch_formula() -> None:
    # A traced graph must not hold the opaque C++ op (ONNX and TorchScript could not run it elsewhere).
    def f(x: torch.Tensor) -> torch.Tensor:
        return quantized_relu(x, torch.tensor(0.2), 4)

    traced = torch.jit.trace(f, torch.randn(8, 5), check_trace=False)
    assert "lightning_ste_kernels" not in str(traced.graph)
    x = torch.randn(8, 5)
    assert torch.equal(traced(x), f(x))


@needs_kernels
def test_torch_compile_calls_the_kernels_forward_and_backward() -> None:
    graphs: list[str] = []

    def f(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return quantized_relu(x, a, 4)

    x = torch.randn(4, 300) * 2
    g = torch.randn(4, 300)
    fast = _run(x, 0.1946, 4, "clipped_relu", "mean", "ceil", True, g)
    ((y, x_grad, a_grad),) = outputs_and_grads(
        [torch.compile(f, backend=recording_backend(graphs), fullgraph=True)], x, g, 0.1946
    )
    assert len(graphs) == 2 and all("lightning_ste_kernels" in s for s in graphs)
    assert torch.equal(y, fast[0]) and torch.equal(x_grad, fast[1])
    torch.testing.assert_close(a_grad, fast[2])


@needs_kernels
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_quantizer_reuses_q_storage_only_when_free(bits: int) -> None:
    """q(W) is written into last step's storage only once nothing holds it: a pending graph or a caller's
    reference keeps its values, and a layer shared within one forward gets correct gradients."""
    quantizer = WeightQuantizer(bits)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    x = torch.randn(2, 8, 5, 5)

    held = quantizer(w)
    kept = held.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # a different q(W) next time
    fresh = quantizer(w)
    assert fresh.data_ptr() != held.data_ptr() and torch.equal(held, kept)
    del held, fresh

    first = quantizer(w)
    address = first.data_ptr()
    del first
    assert quantizer(w).data_ptr() == address  # free again: reused

    # one layer used twice in one forward, then backward: the same gradients as without reuse
    def loss(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
        return (F.conv2d(F.conv2d(x, q1, padding=1).relu()[:, :8], q2, padding=1) ** 2).sum()

    loss(quantizer(w), quantizer(w)).backward()
    got = w.grad.clone()
    w.grad = None
    ref = lambda: quantize_weight(w, bits)  # noqa: E731
    loss(ref(), ref()).backward()
    assert torch.equal(got, w.grad)
    assert "_out" not in quantizer.state_dict() and copy.deepcopy(quantizer)._out is None


def test_weight_quantizer_accepts_inference_tensors() -> None:
    with torch.inference_mode():
        w = torch.randn(8, 4)
        torch.testing.assert_close(WeightQuantizer(1)(w), torch.sign(w) * w.abs().mean())


# ------------------------------------------------------------------ every CPU backend against the oracle

ORACLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _oracle_input(alpha: float, bits: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values, each level exactly and one float32 step either side, signed zeros, NaN, +-inf."""
    x = _boundary_input(alpha, bits, n=300, seed=seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-39, 3e38, -3e38])
    return torch.cat([x, special]).to(dtype)


@pytest.mark.parametrize("name", ["eager", pytest.param("cpu", marks=needs_kernels)])
def test_backend_matches_the_float64_oracle(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """y and grad_x bit for bit, grad_alpha to float32 summation, on bits 1..8, both roundings, every
    region STE and alpha_grad, four dtypes; runs for the eager formula even without the CPU kernels."""
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", name)
    cases = list(itertools.product(range(1, 9), ROUNDINGS, ORACLE_DTYPES))
    for i, (bits, rounding, dtype) in enumerate(cases):
        alpha = (0.75, 0.6511, 0.33, 0.1946, 0.1, 0.05, 0.0237, 0.0125)[bits - 1]
        ste = REGION_STES[i % 3]
        alpha_grad = ALPHA_GRADS[(i // 3) % 4]
        x = _oracle_input(alpha, bits, dtype, seed=i)
        if alpha_grad == "ae":  # sum(grad * y) is non-finite as soon as one y is +-inf: keep it finite
            x = x[x.isfinite()]
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        if i % 3 == 0:
            g[:2] = torch.tensor([float("nan"), float("inf")])
        assert backend.backend_for(x, ste) == name
        xi = x.clone().requires_grad_(True)
        a = torch.tensor(alpha, requires_grad=True)
        y = quantized_relu(
            xi, a, bits, ste=ste, alpha_grad=alpha_grad, alpha_lr_scale=0.01, rounding=rounding
        )
        y.backward(g)
        what = f"{name} bits={bits} {rounding} {dtype} {ste} {alpha_grad}"
        ref.assert_same_bits(y.detach(), ref.forward(x, alpha, bits, rounding), what="y " + what)
        ref.assert_same_bits(xi.grad, ref.grad_x(x, g, alpha, bits, ste), what="grad_x " + what)
        terms = ref.alpha_terms(x, g, alpha, bits, alpha_grad, rounding)
        ref.assert_close_alpha(a.grad, terms, 0.01, what="grad_alpha " + what)


def test_eager_region_code_matches_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-byte code the eager formula saves (what its alpha gradient and mask read), on the boundaries."""
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "eager")
    for bits, dtype in itertools.product((1, 4, 8), ORACLE_DTYPES):
        x = _oracle_input(0.1946, bits, dtype, seed=bits)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t):
            quantized_relu(x.clone().requires_grad_(True), torch.tensor(0.1946, requires_grad=True), bits)
        codes = [t for t in saved if t.dtype == torch.uint8]
        assert len(codes) == 1 and torch.equal(codes[0], ref.region(x, 0.1946, bits)), (bits, dtype)


def test_dispatch_setting_values(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(16)
    for value, expected in (
        ("0", "eager"),
        ("eager", "eager"),
        (" Eager ", "eager"),
        ("1", "auto"),
        ("auto", "auto"),
    ):
        monkeypatch.setenv("LIGHTNING_STE_KERNELS", value)
        assert backend.setting() == expected
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "eager")
    assert backend.backend_for(x) == "eager"
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "auto")
    # auto on a CPU tensor: the CPU kernels where built, never the Triton interpreter
    assert backend.backend_for(x) == ("cpu" if cpu_kernels.available() else "eager")
    assert backend.backend_for(torch.empty(3, device="meta")) == "eager"
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "gpu")
    with pytest.raises(ValueError, match="LIGHTNING_STE_KERNELS='gpu'; allowed: auto, eager, cpu, triton"):
        quantized_relu(x, torch.tensor(0.2), 4)


def test_named_cpu_backend_raises_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_STE_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match="CPU kernels run on CPU tensors"):
        backend.backend_for(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="region-constant STEs"):
        quantized_relu(torch.randn(4), torch.tensor(0.2), 4, ste="log_tailed_relu")
    # the kernels not built (or failed to build): a clear error, not the eager path
    monkeypatch.setitem(cpu_kernels._state, "ok", False)
    with pytest.raises(RuntimeError, match="could not be built"):
        quantized_relu(torch.randn(4), torch.tensor(0.2), 4)
    assert ste_registry.get("clipped_relu").regions == (0.0, 1.0, 0.0)
