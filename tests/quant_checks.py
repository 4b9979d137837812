"""Shared checks for the third-party and pattern suites: run a LightningModule through both callbacks and
verify, independently of the conversion code, what the issue asks of "any LightningModule".

- every ReLU call the float model executes is, after conversion, a QuantReLU call (the float calls are
  counted with a ``TorchFunctionMode``, the quantized ones with forward hooks);
- every layer of the default weight types (found here by ``isinstance``) has a quantized weight;
- one optimizer step moves every latent weight;
- ``lightning_ste.load_from_checkpoint`` rebuilds a model with bit-identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from fixtures import quiet_trainer
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

import lightning_ste
from lightning_ste import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

WEIGHT_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class CountFloatReLU(TorchFunctionMode):
    """Counts the float ReLU (and, with ``relu6=True``, ReLU6) calls that run; nn.ReLU calls F.relu and
    nn.ReLU6 calls F.hardtanh(x, 0, 6), so modules are counted too."""

    def __init__(self, relu6: bool = False) -> None:
        super().__init__()
        self.relu6 = relu6
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            self.calls += 1
        elif self.relu6 and func is F.relu6:
            self.calls += 1
        elif self.relu6 and func is F.hardtanh:
            low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            self.calls += low == 0 and high == 6
        return func(*args, **kwargs)


def count_relu_calls(model: nn.Module, inputs: Sequence[Any], relu6: bool = False) -> tuple[int, int, Any]:
    """(float ReLU calls, QuantReLU calls, output) of one forward, in the model's current mode, no grad."""
    quant_calls = [0]

    def hook(*_: Any) -> None:
        quant_calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, QuantReLU)]
    try:
        with torch.no_grad(), CountFloatReLU(relu6) as mode:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return mode.calls, quant_calls[0], out


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers of the default weight types, found by isinstance (not by the package's own selection)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}


def latent_of(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


def is_quantized(layer: nn.Module) -> bool:
    chains = getattr(layer, "parametrizations", None)
    return chains is not None and "weight" in chains and isinstance(chains.weight[0], WeightQuantizer)


def tiny_trainer(**kwargs: Any) -> L.Trainer:
    options = dict(devices=1, max_steps=1, num_sanity_val_steps=0, limit_val_batches=0)
    return quiet_trainer(**{**options, **kwargs})


def check_module(
    make: Callable[[], L.LightningModule],
    loader: DataLoader,
    inputs: Sequence[Any],
    tmp_path: Path,
    *,
    activations: bool = True,
    targets: Sequence[str] = ("relu",),
    load_kwargs: dict[str, Any] | None = None,
    expect_relu: int | None = None,
) -> L.LightningModule:
    """Fit ``make()`` for one step with both callbacks and check the four properties; return the model."""
    model = make()
    relu6 = "relu6" in targets
    model.eval()
    float_calls, _, _ = count_relu_calls(model, inputs, relu6)
    if activations:
        assert float_calls > 0, "the float model executes no ReLU: nothing to check"
        if expect_relu is not None:
            assert float_calls == expect_relu
    layers_before = weight_layers(model)
    start = {n: m.weight.detach().clone() for n, m in layers_before.items()}
    callbacks: list[L.Callback] = [lightning_ste.BlendedQuantWeights(bits=1, rho=0.01)]
    if activations:
        callbacks.insert(0, lightning_ste.QuantizeActivations(bits=2, targets=targets))
    trainer = tiny_trainer(callbacks=callbacks)
    trainer.fit(model, train_dataloaders=loader)

    model.eval()
    left, quantized_calls, out = count_relu_calls(model, inputs, relu6)
    if activations:
        assert left == 0, f"{left} ReLU calls still run in float"
        assert quantized_calls == float_calls, (quantized_calls, float_calls)
    layers = weight_layers(model)
    assert set(layers) == set(layers_before)
    float_layers = [n for n, m in layers.items() if not is_quantized(m)]
    assert not float_layers, f"weights left float: {float_layers}"
    for name, layer in layers.items():
        assert not torch.equal(latent_of(layer).detach(), start[name]), f"latent of {name} did not move"

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = lightning_ste.load_from_checkpoint(type(model), path, **(load_kwargs or {}))
    with torch.no_grad():
        expected, got = model(*inputs), loaded(*inputs)
    assert torch.equal(got, expected)
    assert torch.equal(out, expected)
    return model
