"""The math, no Lightning: STE registry, quantized ReLU, weight quantizers, the half-Gaussian resolution."""
