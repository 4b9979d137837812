"""Third-party models through both callbacks: the torchvision classification zoo and Lightning's demo modules.

Each model runs on tiny inputs (32x32 images, batch 2, 3 classes) through :func:`quant_checks.check_module`:
every executed ReLU call becomes a QuantReLU call, every Linear/Conv/ConvTranspose weight is quantized, one
step moves every latent, and ``load_from_checkpoint`` gives identical outputs.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from fixtures import SGDClassifier
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, ManualOptimBoringModel
from quant_checks import check_module, tiny_trainer, weight_layers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ste

pytestmark = pytest.mark.usefixtures("one_thread")


def _vgg11() -> nn.Module:
    """VGG-11 (torchvision's class and features) with its classifier narrowed from 4096 to 32 units: the
    same layer sequence, without building 120M parameters."""
    with torch.device("meta"):
        model = tvm.vgg11(num_classes=3, init_weights=False)
    model.features = model.features.to_empty(device="cpu")
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
        nn.Linear(32, 3),
    )  # fmt: skip
    return model


ZOO = {
    "resnet18": lambda: tvm.resnet18(num_classes=3),
    "resnet50": lambda: tvm.resnet50(num_classes=3),
    "vgg11": _vgg11,
    "densenet121": lambda: tvm.densenet121(num_classes=3),
    "squeezenet1_1": lambda: tvm.squeezenet1_1(num_classes=3),
    "googlenet": lambda: tvm.googlenet(num_classes=3, aux_logits=False, init_weights=False),
    "shufflenet_v2_x0_5": lambda: tvm.shufflenet_v2_x0_5(num_classes=3),
    "mnasnet0_5": lambda: tvm.mnasnet0_5(num_classes=3),
    "regnet_y_400mf": lambda: tvm.regnet_y_400mf(num_classes=3),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=3),
}


class ZooModule(SGDClassifier):
    def __init__(self, arch: str) -> None:
        super().__init__(lr=0.05)
        self.save_hyperparameters()
        self.net = ZOO[arch]()


def _images() -> tuple[DataLoader, torch.Tensor]:
    x = torch.randn(2, 3, 32, 32)
    return DataLoader(TensorDataset(x, torch.tensor([0, 2])), batch_size=2), x


@pytest.mark.parametrize("arch", list(ZOO))
def test_torchvision_zoo(arch, tmp_path):
    loader, x = _images()
    targets = ("relu", "relu6") if arch == "mobilenet_v2" else ("relu",)
    check_module(lambda: ZooModule(arch), loader, (x,), tmp_path, targets=targets)


def test_mobilenet_v2_relu6_is_named_not_silent():
    """Without `targets`, the 35 ReLU6 of MobileNetV2 are named in the error instead of "no ReLU found"."""
    with pytest.raises(ValueError, match=r"35 nn\.ReLU6.*targets=\('relu', 'relu6'\)"):
        lightning_ste.quantize_activations_(tvm.mobilenet_v2(num_classes=3))


class TinyTransformer(LightningTransformer):
    """Lightning's demo LightningTransformer (nn.Transformer, 2+2 layers, ReLU FFNs), without the WikiText2
    download."""

    def prepare_data(self) -> None:
        pass


def test_lightning_transformer_demo(tmp_path):
    tokens = torch.randint(0, 16, (2, 6))
    loader = DataLoader(TensorDataset(tokens, tokens.roll(1, 1)), batch_size=2)
    model = check_module(
        lambda: TinyTransformer(vocab_size=16),
        loader,
        (tokens, tokens.roll(1, 1)),
        tmp_path,
        load_kwargs={"vocab_size": 16},
        expect_relu=4,  # one FFN activation per encoder and decoder layer
    )
    # Each layer's FFN activation is its own QuantReLU; the attention's out_proj (a Linear) is quantized.
    transformer = model.model.transformer
    acts = [layer.activation for layer in [*transformer.encoder.layers, *transformer.decoder.layers]]
    assert all(isinstance(a, lightning_ste.QuantReLU) for a in acts) and len({id(a) for a in acts}) == 4
    assert "encoder.layers.0.self_attn.out_proj" in {
        n.partition("transformer.")[2] for n in weight_layers(model)
    }


def test_boring_model_demos(tmp_path, capsys):
    """BoringModel and its manual-optimization variant (one Linear, no ReLU) with BlendedQuantWeights, DemoModel
    (torch.relu in forward) with both callbacks."""
    x = torch.randn(2, 32)
    for i, make in enumerate([BoringModel, ManualOptimBoringModel]):
        check_module(make, DataLoader(x, batch_size=2), (x,), tmp_path / str(i), activations=False)
    check_module(DemoModel, DataLoader(x, batch_size=2), (x,), tmp_path / "demo", expect_relu=1)
    # QuantizeActivations on a model without ReLU says so instead of converting nothing.
    with pytest.raises(ValueError, match="no ReLU found in BoringModel"):
        tiny_trainer(callbacks=[lightning_ste.QuantizeActivations()]).fit(BoringModel())
