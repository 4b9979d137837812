"""Bit-aware summary: sizes computed by hand, ResNet-18 W1A4 with and without float first/last layers."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from fixtures import quiet_trainer
from torch import nn
from torch.nn.utils import parametrize

import lightning_ste
from lightning_ste import (
    BlendedQuantWeights,
    QuantizeActivations,
    QuantReLU,
    QuantSummary,
    WeightQuantizer,
    quantize_activations_,
    quantize_weights_,
)
from lightning_ste.bit_summary import QuantModelSummary, summary


def small_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(10, 20),
        QuantReLU(bits=2),  # learned alpha: a parameter
        nn.BatchNorm1d(20),
        nn.Linear(20, 5),
        QuantReLU(bits=3, alpha_mode="fixed"),  # alpha: a buffer
        nn.Linear(5, 3),
    )
    parametrize.register_parametrization(model[0], "weight", WeightQuantizer(bits=1))
    parametrize.register_parametrization(model[3], "weight", WeightQuantizer(bits=2, per_channel=True))
    return model


def test_small_model_sizes_by_hand():
    s = summary(small_model())
    rows = {r.name: r for r in s.layers}
    assert list(rows) == ["0", "1", "2", "3", "4", "5"]
    # 0: 200 weights at 1 bit + one fp32 scale; 20 fp32 biases.
    assert rows["0"].quantized_bits == 200 + 32 + 20 * 32
    assert rows["0"].fp32_bits == 220 * 32
    assert (rows["0"].weight_bits, rows["0"].activation_bits, rows["0"].params) == (1, None, 220)
    assert rows["0"].type == "Linear"
    # 1: learned alpha, one fp32 parameter.
    assert (rows["1"].params, rows["1"].fp32_bits, rows["1"].quantized_bits) == (1, 32, 32)
    assert (rows["1"].weight_bits, rows["1"].activation_bits) == (None, 2)
    # 2: BatchNorm weight, bias, running mean and var in fp32 (the int64 batch counter is not stored).
    assert (rows["2"].params, rows["2"].fp32_bits, rows["2"].quantized_bits) == (40, 80 * 32, 80 * 32)
    assert rows["2"].weight_bits == 32
    # 3: ternary, per output channel: 100 weights at 2 bits + 5 scales; 5 biases.
    assert rows["3"].quantized_bits == 100 * 2 + 5 * 32 + 5 * 32
    assert rows["3"].fp32_bits == 105 * 32
    # 4: fixed alpha, a buffer: no parameter, 32 bits.
    assert (rows["4"].params, rows["4"].quantized_bits, rows["4"].activation_bits) == (0, 32, 3)
    # 5: float layer.
    assert (rows["5"].weight_bits, rows["5"].quantized_bits, rows["5"].fp32_bits) == (32, 18 * 32, 18 * 32)

    assert s.total_params == 220 + 1 + 40 + 105 + 18
    assert s.quantized_params == 300
    assert s.fp32_bytes == (220 + 1 + 80 + 105 + 1 + 18) * 32 / 8 == 1700
    assert s.quantized_bytes == (872 + 32 + 2560 + 520 + 32 + 576) / 8 == 574
    assert s.compression == pytest.approx(1700 / 574)

    text = str(s)
    for needle in (
        "W bits",
        "A bits",
        "QuantReLU",
        "BatchNorm1d",
        "300          Quantized weights (2 layers)",
    ):
        assert needle in text, needle
    assert "0.002        Model size at fp32 (MB)" in text
    assert "0.001        Model size at the real bit-widths (MB)" in text
    assert "2.96         Compression (fp32 / quantized)" in text


def test_other_parametrizations_count_as_float():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(layer, "weight", Double())
    (row,) = summary(layer).layers
    assert (row.params, row.weight_bits, row.weight_quantized, row.quantized_bits) == (16, 32, False, 16 * 32)


def test_package_attribute_is_callable():
    s = lightning_ste.summary(small_model())
    assert isinstance(s, QuantModelSummary)
    assert s.quantized_params == 300
    with pytest.raises(ValueError, match="model"):
        summary("not a module")


def _resnet18_expected(model: nn.Module) -> tuple[float, float, int]:
    """(fp32 bytes, quantized bytes, quantized layers) straight from the state_dict: 1 bit + one scale per
    latent weight, 32 bits for every other floating-point entry."""
    fp32 = quant = layers = 0
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        fp32 += 32 * value.numel()
        if key.endswith("parametrizations.weight.original"):
            quant += value.numel() + 32
            layers += 1
        else:
            quant += 32 * value.numel()
    return fp32 / 8, quant / 8, layers


@pytest.mark.parametrize("keep_first_last", [False, True])
def test_resnet18_w1a4(keep_first_last):
    model = torchvision.models.resnet18()
    quantize_weights_(model, bits=1, keep_first_last=keep_first_last, example_input=torch.rand(1, 3, 64, 64))
    quantize_activations_(model, bits=4)
    s = summary(model)
    fp32, quant, layers = _resnet18_expected(model)
    assert s.fp32_bytes == fp32 == 4 * (11_689_512 + 17 + 2 * 4_800)  # params + alphas + BN running stats
    assert s.quantized_bytes == quant
    assert sum(r.weight_quantized for r in s.layers) == layers == (19 if keep_first_last else 21)
    assert sum(r.activation_bits == 4 for r in s.layers) == 17  # every ReLU call site, 2 per BasicBlock
    rows = {r.name: r for r in s.layers}
    assert rows["conv1"].weight_bits == rows["fc"].weight_bits == (32 if keep_first_last else 1)
    # The headline numbers: 46.80 MB at fp32; 1.54 MB all 1-bit; 3.56 MB with float conv1 and fc.
    assert s.fp32_bytes / 1e6 == pytest.approx(46.797, abs=1e-3)
    assert s.quantized_bytes / 1e6 == pytest.approx(3.561 if keep_first_last else 1.541, abs=1e-3)


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_quant_summary_callback_prints_the_converted_model_at_fit_start(tmp_path, caplog):
    callback = QuantSummary()
    trainer = quiet_trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        # The summary callback comes first: it still runs after the conversions done in `setup`.
        callbacks=[callback, QuantizeActivations(bits=2), BlendedQuantWeights(bits=2)],
    )
    model = MLP()
    with caplog.at_level(logging.INFO):
        trainer.fit(model, torch.utils.data.DataLoader(torch.randn(8, 16), batch_size=4))
    s = callback.last_summary
    assert s is not None
    assert s.quantized_params == 16 * 32 + 32 * 4
    assert [r.activation_bits for r in s.layers if r.activation_bits] == [2]
    # 640 weights at 2 bits + 2 scales, 36 biases and 1 alpha at 32 bits.
    assert s.quantized_bytes == (640 * 2 + 2 * 32 + 37 * 32) / 8
    assert str(s) in caplog.text
