"""freeze / ONNX / packed round trips for a W1A4 ResNet-18 and a W2A2 MLP (real MNIST inputs)."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision
from fixtures import MLPClassifier, quiet_trainer
from torch import nn
from torch.nn.utils import parametrize

from lightning_ste import (
    BlendedQuantWeights,
    QuantizeActivations,
    QuantReLU,
    WeightQuantizer,
    quantize_activations_,
    quantize_weights_,
)
from lightning_ste.bit_summary import summary
from lightning_ste.export import (
    FrozenQuantReLU,
    freeze,
    load_packed,
    pack_bits,
    save_packed,
    to_onnx,
    unpack_bits,
)
from lightning_ste.recipes.data.mnist import MNISTDataModule


def resnet18_w1a4() -> nn.Module:
    """torchvision ResNet-18, every conv/linear weight 1-bit, every ReLU call site 4-bit (BCGD19 setting 5).

    BatchNorm gets the non-trivial statistics of a trained network. With the fresh ones (mean 0, var 1,
    affine identity) a sum of +-delta * k * alpha that cancels exactly lands on the ceil boundary 0 of the
    next quantized ReLU, and which level it takes depends on the float summation order of the backend.
    """
    model = torchvision.models.resnet18()
    quantize_weights_(model, bits=1)
    quantize_activations_(model, bits=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def mlp_w2a2() -> nn.Module:
    """784-256-128-10 MLP, ternary (2-bit) weights, 2-bit activations."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    quantize_weights_(model, bits=2)
    quantize_activations_(model, bits=2)
    return model.eval()


@pytest.fixture(scope="module")
def mnist_images(mnist_root) -> torch.Tensor:
    test = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    return ((test.data[:64].float() / 255 - 0.1307) / 0.3081).unsqueeze(1)


@pytest.fixture(params=["resnet18_w1a4", "mlp_w2a2"])
def case(request, mnist_images):
    torch.manual_seed(0)
    if request.param == "resnet18_w1a4":
        return resnet18_w1a4(), torch.rand(1, 3, 64, 64), 1
    return mlp_w2a2(), mnist_images, 2


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_freeze_gives_a_constant_eval_copy_with_the_same_outputs(case):
    model, x, weight_bits = case
    expected = _outputs(model, x)
    n_sites = sum(isinstance(m, QuantReLU) for m in model.modules())
    model.train()  # freeze returns an eval copy whatever the mode of the model
    frozen = freeze(model)

    assert torch.equal(_outputs(frozen, x), expected)
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(parametrize.is_parametrized(m) for m in frozen.modules())
    assert not any(isinstance(m, (QuantReLU, WeightQuantizer)) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    relus = [m for m in frozen.modules() if isinstance(m, FrozenQuantReLU)]
    assert len(relus) == n_sites
    assert all("alpha" in dict(m.named_buffers()) and not list(m.parameters()) for m in relus)
    # Weights are the constant q(W): two magnitudes at most for 1-bit (0 only for an exact zero latent).
    first = frozen.conv1 if weight_bits == 1 else frozen[1]
    assert first.weight.abs().unique().numel() <= 2
    # The model itself is untouched: still parametrized, still training, same outputs in eval.
    assert model.training and parametrize.is_parametrized(model.conv1 if weight_bits == 1 else model[1])
    assert torch.equal(_outputs(model.eval(), x), expected)
    # Freezing a frozen model copies it.
    assert torch.equal(_outputs(freeze(frozen), x), expected)


def test_frozen_quant_relu_is_the_training_forward():
    x = torch.cat(
        [torch.linspace(-1, 4, 2001), torch.tensor([0.0, float("inf"), -float("inf"), float("nan")])]
    )
    for bits, rounding in [(1, "ceil"), (2, "nearest"), (4, "ceil"), (8, "nearest")]:
        q = QuantReLU(bits=bits, alpha=0.37, rounding=rounding).eval()
        f = FrozenQuantReLU.from_quant_relu(q)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            xd = x.to(dtype)
            torch.testing.assert_close(f(xd), q(xd).detach(), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="rounding"):
        FrozenQuantReLU(2, 0.5, rounding="floor")


def test_to_onnx_matches_onnxruntime(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, x, _ = case
    path = to_onnx(model, x[:2], tmp_path / "model.onnx")
    assert path.exists()
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"Ceil", "Clip"} <= ops  # the quantized ReLU as plain operators, no custom domain
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Exported with a dynamic batch: run the whole input, not the 2-sample example.
    (got,) = session.run(None, {"input": x.numpy()})
    expected = _outputs(model, x).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_packed_round_trip(case, tmp_path, caplog):
    model, x, weight_bits = case
    expected = _outputs(model, x)
    path = tmp_path / "model.ltq"
    with caplog.at_level(logging.INFO):
        size = save_packed(model, path)
    assert size == path.stat().st_size
    assert f"{size / 1e6:.3f} MB" in caplog.text

    loaded = load_packed(path)
    assert torch.equal(_outputs(loaded, x), expected)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    # The weights really are stored at their bit-width: numel * bits / 8 bytes each, plus one scale.
    stored = torch.load(path, weights_only=False)
    quantized = {f"{n}.weight": layer.parametrizations.weight.original for n, layer in _quantized(model)}
    assert set(stored["packed"]) == set(quantized)
    for name, w in quantized.items():
        blob = stored["packed"][name]
        assert blob["bits"] == weight_bits
        assert blob["data"].dtype == torch.uint8
        assert blob["data"].numel() == math.ceil(w.numel() * weight_bits / 8)
        assert blob["scale"].numel() == 1
        assert stored["module"].get_parameter(name).numel() == 0  # no float copy of the weight
    # The file is the packed weights plus the float rest and the pickled structure.
    s = summary(model)
    assert size < s.fp32_bytes / 8
    assert size < s.quantized_bytes * 1.2 + 64_000


def _quantized(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000, 1001])
def test_pack_bits_round_trip(bits, count):
    values = torch.randint(0, 2**bits, (count,))
    data = pack_bits(values, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(data, bits, count), values)


def test_pack_bits_layout_is_lsb_first():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b1]
    assert pack_bits(torch.tensor([3, 0, 2]), 2).tolist() == [0b100011]


def _linear_model(bits: int, per_channel: bool, rounding: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 9), QuantReLU(bits=3, rounding=rounding), nn.Linear(9, 5))
    for layer in (model[0], model[2]):
        parametrize.register_parametrization(
            layer, "weight", WeightQuantizer(bits=bits, per_channel=per_channel)
        )
    return model.eval()


@pytest.mark.parametrize("bits, per_channel", [(1, True), (2, True), (3, False), (4, True), (8, False)])
def test_b_bit_and_per_channel_codes_round_trip_from_model_and_from_frozen(bits, per_channel, tmp_path):
    model = _linear_model(bits, per_channel, rounding="nearest")
    x = torch.randn(16, 12)
    expected = _outputs(model, x)
    for source in (model, freeze(model)):  # a frozen model: codes recovered from q(W)
        path = tmp_path / "m.ltq"
        save_packed(source, path)
        stored = torch.load(path, weights_only=False)
        blob = stored["packed"]["0.weight"]
        assert blob["bits"] == bits
        assert blob["scale"].numel() == (9 if per_channel else 1)
        torch.testing.assert_close(_outputs(load_packed(path), x), expected, rtol=0, atol=1e-6)
    # From the training model the weights come back bit for bit.
    save_packed(model, tmp_path / "exact.ltq")
    assert torch.equal(_outputs(load_packed(tmp_path / "exact.ltq"), x), expected)


def test_one_bit_layers_with_exact_zero_weights(tmp_path):
    """sign(0) = 0: a few zeros are listed by index, many make the layer ternary."""
    model = _linear_model(1, per_channel=False, rounding="ceil")
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, 0] = 0.0  # 1 of 108
        model[2].parametrizations.weight.original[:, :3] = 0.0  # 15 of 45
    x = torch.randn(16, 12)
    expected = _outputs(model, x)
    save_packed(model, tmp_path / "m.ltq")
    stored = torch.load(tmp_path / "m.ltq", weights_only=False)
    first, second = stored["packed"]["0.weight"], stored["packed"]["2.weight"]
    assert (first["bits"], first["zeros"].tolist()) == (1, [0])
    assert second["bits"] == 2 and second["encoding"] == "offset"
    assert torch.equal(_outputs(load_packed(tmp_path / "m.ltq"), x), expected)


def test_tied_latent_weights(tmp_path):
    """Two 4-bit layers share one latent W; a float layer is tied to that latent W too."""
    model = nn.Sequential(
        nn.Linear(6, 6), QuantReLU(bits=3), nn.Linear(6, 6), QuantReLU(bits=3), nn.Linear(6, 6)
    )
    for i in (0, 2):
        parametrize.register_parametrization(model[i], "weight", WeightQuantizer(bits=4))
    latent = model[0].parametrizations.weight.original
    model[2].parametrizations.weight.original = latent
    model[4].weight = latent
    model.eval()
    x = torch.randn(8, 6)
    expected = _outputs(model, x)
    frozen = freeze(model)
    # q(W) is not idempotent for b >= 3 bits: the second layer must not quantize the first one's q(W).
    assert torch.equal(_outputs(frozen, x), expected)
    assert frozen[2].weight is frozen[0].weight
    assert torch.equal(frozen[4].weight, latent) and not torch.equal(frozen[0].weight, latent)
    save_packed(model, tmp_path / "tied.ltq")
    loaded = load_packed(tmp_path / "tied.ltq")
    assert loaded[2].weight is loaded[0].weight
    assert torch.equal(_outputs(loaded, x), expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="model"):
        freeze("model")
    with pytest.raises(ValueError, match="model"):
        save_packed(3, "x.ltq")


def test_frozen_and_packed_models_match_the_trained_one_with_alpha_below_its_floor(tmp_path):
    """An alpha that collapsed under the floor 1e-3: training forward, freeze and load_packed all quantize
    with step 1e-3, i.e. 1e-3 * clamp(ceil(x / 1e-3), 0, L), not with the stored alpha."""
    pl.seed_everything(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))  # no staircase after it to hide it
    quantize_activations_(model, bits=2)
    quantize_weights_(model, bits=1)
    with torch.no_grad():
        model[1].alpha.fill_(1e-5)
    model.eval()
    x = 0.002 * torch.randn(64, 6)  # pre-activations of a few multiples of the floor
    with torch.no_grad():
        h = model[0](x)
        y = model(x)
        assert torch.allclose(model[1](h), 1e-3 * torch.ceil(h / 1e-3).clamp(0, 3), atol=1e-9)
        assert bool((h > 1e-5).any() & (h < 1e-3).any())  # a floor ignored would quantize differently
        frozen = freeze(model)
        assert torch.equal(frozen[1](h), model[1](h)) and torch.equal(frozen(x), y)
        save_packed(model, tmp_path / "floor.ltq")
        packed = load_packed(tmp_path / "floor.ltq")
        assert torch.equal(packed[1](h), model[1](h)) and torch.equal(packed(x), y)


def test_load_packed_is_strict_a_missing_and_an_unexpected_blob_fail(tmp_path):
    pl.seed_everything(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    quantize_weights_(model, bits=1)
    save_packed(model, tmp_path / "m.ltq")
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.ltq")(x), model(x))  # the untouched file loads
    blob = torch.load(tmp_path / "m.ltq", weights_only=False)
    blob["packed"]["9.weight"] = blob["packed"].pop("2.weight")
    torch.save(blob, tmp_path / "bad.ltq")
    with pytest.raises(
        ValueError, match=r"missing for \['2\.weight'\]; packed weights for no parameter \['9\.weight'\]"
    ):
        load_packed(tmp_path / "bad.ltq")


def test_load_packed_refuses_other_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lightning_ste packed model"):
        load_packed(tmp_path / "other.pt")


def test_export_is_the_lazy_package_attribute(monkeypatch):
    import sys

    import lightning_ste

    # Importing lightning_ste.export bound it on the package; without that binding the lazy __getattr__ answers.
    monkeypatch.delattr(lightning_ste, "export")
    assert "export" not in vars(lightning_ste)
    lazy = lightning_ste.export
    assert (
        lazy is sys.modules["lightning_ste.export"]
        and lazy.freeze is freeze
        and lazy.load_packed is load_packed
    )


def test_lightning_module_trained_with_the_callbacks(tmp_path, mnist_root):
    ort = pytest.importorskip("onnxruntime")
    data = MNISTDataModule(root=str(mnist_root), batch_size=64, subset=512, flatten=True, download=False)
    model = MLPClassifier(784, 64, 10, momentum=0.9)
    trainer = quiet_trainer(
        max_steps=8,
        default_root_dir=tmp_path,
        callbacks=[QuantizeActivations(bits=4), BlendedQuantWeights(bits=1, rho=1e-3)],
    )
    trainer.fit(model, datamodule=data)
    model.eval()
    x = data.train_data[0][:32]
    expected = _outputs(model, x)
    frozen = freeze(model)  # a LightningModule still attached to its trainer
    assert torch.equal(_outputs(frozen, x), expected)
    assert model.trainer is trainer and frozen._trainer is None
    save_packed(model, tmp_path / "mnist.ltq")
    assert torch.equal(_outputs(load_packed(tmp_path / "mnist.ltq"), x), expected)
    (got,) = ort.InferenceSession(
        str(to_onnx(model, x[:1], tmp_path / "mnist.onnx")), providers=["CPUExecutionProvider"]
    ).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
