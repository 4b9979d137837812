#!/usr/bin/env bash
# Prepared GPU check, at most 5.5 minutes on one H100 (timeouts 120 s + 210 s): (1) quantized_relu and quantize_weight on CUDA against
# the CPU (the CPU runs the fused kernels when they build), eager and torch.compile; (2) the CUDA ResNet-18
# table: 224x224, batch 256, 16-mixed, channels_last; fp32 vs A4 vs W1A4, eager and compiled, in img/s.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Exit status: non-zero when the correctness check fails (the table still runs and prints).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

status=0
# The CPU side runs the eager formula here (tests/test_kernels.py checks the fused CPU kernels against it),
# which also spares this script the one-off C++ build.
LIGHTNING_STE_KERNELS=0 timeout 120 python - <<'PY' || status=1
import itertools, sys, torch
from lightning_ste.functional import quantized_relu, quantize_weight

assert torch.cuda.is_available(), "no CUDA device"
torch.manual_seed(0)
failures = []

def run(x, alpha, bits, ste, mode, rounding, dtype, device, fn=quantized_relu):
    xi = x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    a = torch.tensor(alpha, device=device, requires_grad=True)
    g = torch.linspace(-1, 1, x.numel()).reshape(x.shape).to(device=device, dtype=dtype)
    y = fn(xi, a, bits, ste, mode, 0.01, rounding)
    y.backward(g)
    return y.detach().cpu(), xi.grad.cpu(), a.grad.cpu()

def same(u, v):
    return torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(), v.nan_to_num())

levels_x = torch.cat([torch.randn(20000) * 2, torch.arange(-2, 260) * 0.1946,
                      torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
checked = 0
for dtype, bits, ste, mode, rounding in itertools.product(
    (torch.float32, torch.float16, torch.bfloat16), (1, 2, 4, 8), ("identity", "relu", "clipped_relu", "log_tailed_relu"),
    ("mean", "ae", "pact"), ("ceil", "nearest")):
    cpu = run(levels_x, 0.1946, bits, ste, mode, rounding, dtype, "cpu")
    gpu = run(levels_x, 0.1946, bits, ste, mode, rounding, dtype, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    gx_ok = same(cpu[1], gpu[1]) if ste != "log_tailed_relu" else torch.allclose(
        cpu[1].float(), gpu[1].float(), rtol=tol, atol=1e-6, equal_nan=True)
    ok = same(cpu[0], gpu[0]) and gx_ok and torch.allclose(cpu[2], gpu[2], rtol=tol, atol=1e-4, equal_nan=True)
    checked += 1
    if not ok:
        failures.append(f"quantized_relu {dtype} bits={bits} ste={ste} alpha_grad={mode} rounding={rounding}: "
                        f"y {same(cpu[0], gpu[0])} grad_x {gx_ok} grad_alpha {cpu[2].item()} vs {gpu[2].item()}")

# torch.compile(fullgraph=True) on the GPU against eager CPU
compiled = torch.compile(quantized_relu, fullgraph=True)
x = torch.randn(64, 1000) * 2
for rounding in ("ceil", "nearest"):
    cpu = run(x, 0.1946, 4, "clipped_relu", "mean", rounding, torch.float32, "cpu")
    gpu = run(x, 0.1946, 4, "clipped_relu", "mean", rounding, torch.float32, "cuda", compiled)
    checked += 1
    if not (same(cpu[0], gpu[0]) and same(cpu[1], gpu[1]) and torch.allclose(cpu[2], gpu[2], rtol=1e-4, atol=1e-4)):
        failures.append(f"compiled quantized_relu rounding={rounding} differs from CPU")

for bits, per_channel in itertools.product(range(1, 9), (False, True)):
    w = torch.randn(64, 32, 3, 3)
    q_cpu = quantize_weight(w, bits, per_channel)
    q_gpu = quantize_weight(w.cuda(), bits, per_channel).cpu()
    checked += 1
    if not torch.allclose(q_cpu, q_gpu, rtol=1e-5, atol=1e-6):
        failures.append(f"quantize_weight bits={bits} per_channel={per_channel}: max diff {(q_cpu - q_gpu).abs().max():.3g}")

print(f"correctness on {torch.cuda.get_device_name(0)} vs CPU: {checked - len(failures)}/{checked} cases agree")
for f in failures[:20]:
    print("  MISMATCH", f)
sys.exit(1 if failures else 0)
PY
echo "correctness check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"

timeout 210 python benchmarks/bench_resnet18.py --device cuda \
    --only "A4,W1A4,fp32 compiled,W1A4 compiled" --rounds 5 --steps 5 --warmup 3 || status=1
exit $status
