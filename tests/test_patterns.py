"""The Lightning and PyTorch patterns that used to be converted silently wrong or not at all.

Transformer layers, layers built in ``configure_model``, ConvTranspose, lazy modules, tied weights, forwards
that assign attributes, ReLU6 and the "what stays float" part of both plans. Tiny models, a few steps.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from quant_checks import check_module, count_relu_calls, is_quantized, latent_of, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ste
from lightning_ste import QuantReLU
from lightning_ste.export import load_packed, save_packed
from lightning_ste.recipe import recipes_on
from lightning_ste.surgery.activation_plan import plan_activations
from lightning_ste.surgery.weight_params import plan_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(*tensors: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0]))


class Regressor(L.LightningModule):
    """A LightningModule around any ``net`` (built by ``make``), MSE to zero, SGD."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------- Transformer


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(x, self.enc(x)))


def test_transformer_layers_quantized_and_train_equals_eval():
    model = Seq2Seq()
    x = torch.randn(2, 5, 8)
    model.eval()
    assert count_relu_calls(model, (x,))[0] == 3
    plan = plan_weights(model).format()
    names = lightning_ste.quantize_activations_(model, bits=2, alpha=0.05)
    lightning_ste.quantize_weights_(model, bits=1)
    acts = [model.enc.layers[0].activation, model.enc.layers[1].activation, model.dec.activation]
    assert all(isinstance(a, QuantReLU) for a in acts) and len({id(a) for a in acts}) == 3
    assert sorted(names) == ["dec.activation", "enc.layers.0.activation", "enc.layers.1.activation"]
    left, quantized_calls, _ = count_relu_calls(model, (x,))
    assert (left, quantized_calls) == (0, 3)
    for layer in [*model.enc.layers, model.dec]:
        assert (
            is_quantized(layer.linear1)
            and is_quantized(layer.linear2)
            and is_quantized(layer.self_attn.out_proj)
        )
    assert "self_attn.in_proj_weight (MultiheadAttention): a bare Parameter" in plan
    # Eval without grad is where PyTorch's fused fast paths would run a float ReLU and fused attention: they are
    # off for converted layers, so every QuantReLU runs and train and eval outputs are bit-identical.
    calls = []
    for a in acts:
        a.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    train_out = model(x)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert len(calls) == 6
    assert torch.equal(train_out, eval_out)


# ---------------------------------------------------------------------------------------- configure_model


class BuiltInConfigureModel(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:  # Lightning may call it again on a later fit
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _callbacks() -> list[L.Callback]:
    return [lightning_ste.QuantizeActivations(bits=2), lightning_ste.BlendedQuantWeights(bits=1, rho=0.01)]


def test_layers_built_in_configure_model_are_converted_before_restore(tmp_path):
    x = torch.randn(4, 6)
    model = BuiltInConfigureModel()
    trainer = tiny_trainer(callbacks=_callbacks())
    trainer.fit(model, _loader(x))
    assert isinstance(model.net[1], QuantReLU) and is_quantized(model.net[0]) and is_quantized(model.net[2])
    assert "configure_model" not in model.__dict__  # the one-call wrapper is gone
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(latent_of(model.net[0])) in held and id(model.net[1].alpha) in held
    path = tmp_path / "cm.ckpt"
    trainer.save_checkpoint(path)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    # Fresh objects: the checkpoint restore finds the converted layers (it runs after configure_model).
    preds = tiny_trainer(callbacks=_callbacks()).predict(BuiltInConfigureModel(), _loader(x), ckpt_path=path)
    assert torch.equal(preds[0], expected)
    resumed = BuiltInConfigureModel()
    tiny_trainer(callbacks=_callbacks(), max_steps=2).fit(resumed, _loader(x), ckpt_path=path)
    assert resumed.trainer.global_step == 2 and isinstance(resumed.net[1], QuantReLU)
    loaded = lightning_ste.load_from_checkpoint(BuiltInConfigureModel, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


class BuiltInSetup(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def setup(self, stage: str) -> None:  # Lightning calls it after every callback's setup
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def test_layers_built_in_setup_are_converted():
    model = BuiltInSetup()
    tiny_trainer(callbacks=_callbacks()).fit(model, _loader(torch.randn(4, 6)))
    assert isinstance(model.net[1], QuantReLU) and is_quantized(model.net[0]) and is_quantized(model.net[2])
    assert "setup" not in model.__dict__


# ------------------------------------------------------------------------------------------ ConvTranspose


def _twn_per_output_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Ternary TWN q of a ConvTranspose weight [in, out/groups, *k], one scale per output channel, in float64."""
    w = w.double()
    q = torch.empty_like(w)
    per_in, per_out = w.shape[0] // groups, w.shape[1]
    for g in range(groups):
        for j in range(per_out):
            s = w[g * per_in : (g + 1) * per_in, j]
            keep = s.abs() > 0.7 * s.abs().mean()
            q[g * per_in : (g + 1) * per_in, j] = s.abs()[keep].mean() * s.sign() * keep
    return q


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_per_channel_scales_along_output_channels(groups, tmp_path):
    layers = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=groups), nn.ConvTranspose1d(4, 6, 2, groups=groups)
    )
    latents = [layer.weight.detach().clone() for layer in layers]
    assert lightning_ste.quantize_weights_(layers, bits=2, per_channel=True) == ["0", "1"]
    for layer, w in zip(layers, latents):
        expected = _twn_per_output_channel(w, groups)
        assert torch.equal(layer.weight.detach().sign(), expected.sign().float())
        torch.testing.assert_close(layer.weight.detach().double(), expected, rtol=1e-6, atol=0)
    # 2-bit codes, one fp32 scale per output channel (6, not 4 input channels), the fp32 bias.
    assert lightning_ste.summary(layers).layers[0].quantized_bits == 2 * latents[0].numel() + 32 * 6 + 32 * 6
    # The packed file stores codes and scales in the same layout: the reloaded weights are q(W) exactly.
    save_packed(layers, tmp_path / "ct.ltq")
    packed = load_packed(tmp_path / "ct.ltq")
    for layer, restored in zip(layers, packed):
        assert torch.equal(restored.weight, layer.weight.detach())


class Decoder(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU(),
            nn.Conv2d(4, 3, 1),
        )  # fmt: skip


def test_conv_transpose_decoder_trains_and_reloads(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    check_module(Decoder, _loader(x), (x,), tmp_path, expect_relu=2)


# ------------------------------------------------------------------------------------------------- lazy


class LazyNet(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        self.example_input_array = torch.zeros(
            1, 3, 6, 6
        )  # load_from_checkpoint probes the lazy layers with it


def test_lazy_modules_are_materialised_or_refused(tmp_path):
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"0, 2 still have uninitialized \(lazy\).*example_input"):
        lightning_ste.quantize_weights_(model)
    assert isinstance(model[0], nn.LazyLinear)  # unchanged
    x = torch.randn(2, 3, 6, 6)
    model = LazyNet()
    trainer = tiny_trainer(callbacks=_callbacks())
    trainer.fit(model, _loader(x))
    assert is_quantized(model.net[0]) and is_quantized(model.net[3]) and model.net[3].weight.shape == (2, 64)
    path = tmp_path / "lazy.ckpt"
    trainer.save_checkpoint(path)
    loaded = lightning_ste.load_from_checkpoint(LazyNet, path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------------------------- tied


class Tied(Regressor):
    def __init__(self) -> None:
        super().__init__(lr=0.0)  # the optimizer moves nothing: what changes is the blend alone
        self.net = nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False))
        self.net[2].weight = self.net[0].weight


def test_tied_weight_has_one_latent_one_quantizer_one_blend(tmp_path, capsys):
    x = torch.randn(4, 6)
    model = Tied()
    w0 = model.net[0].weight.detach().double().clone()
    rho = 0.5
    trainer = tiny_trainer(callbacks=[lightning_ste.BlendedQuantWeights(bits=1, rho=rho)])
    trainer.fit(model, _loader(x))
    a, b = model.net[0], model.net[2]
    assert latent_of(a) is latent_of(b) and a.parametrizations.weight[0] is b.parametrizations.weight[0]
    params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert sum(p is latent_of(a) for p in params) == 1
    q0 = w0.abs().mean() * w0.sign()
    once = (1 - rho) * w0 + rho * q0
    twice = (1 - rho) * once + rho * once.abs().mean() * once.sign()
    got = latent_of(a).detach().double()
    torch.testing.assert_close(got, once, rtol=0, atol=1e-6)
    assert (got - twice).abs().max() > 1e-3
    assert "weight shared with net.2.weight" in capsys.readouterr().out + plan_weights(Tied()).format()
    path = tmp_path / "tied.ckpt"
    trainer.save_checkpoint(path)
    loaded = lightning_ste.load_from_checkpoint(Tied, path)
    assert latent_of(loaded.net[0]) is latent_of(loaded.net[2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------------- attribute-assigning


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.mask: torch.Tensor | None = None
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.mask = h > 0
        return F.relu(h) * self.mask


class MaskedModule(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(Masked(), nn.ReLU(), nn.Linear(6, 2))


def test_tracing_never_changes_the_model():
    model = MaskedModule()
    x = torch.randn(3, 6)
    state = copy.deepcopy(model.state_dict())
    attributes = {i: dict(m.__dict__) for i, m in enumerate(model.modules())}
    expected = model(x)
    model.net[0].mask = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_ste.quantize_activations_(model, dry_run=True)
    assert any("net.0 (Masked): its forward assigns self.mask" in str(w.message) for w in caught)
    assert model.net[0].mask is None
    for i, m in enumerate(model.modules()):  # every attribute is the very object it was
        assert m.__dict__.keys() == attributes[i].keys()
        assert all(m.__dict__[k] is v for k, v in attributes[i].items())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model(x), expected)
    # Converting for real: the untraceable module keeps its functional ReLU in float, and training runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_trainer(callbacks=[lightning_ste.QuantizeActivations(bits=2)]).fit(model, _loader(x))
    assert isinstance(model.net[1], QuantReLU) and isinstance(model.net[0].mask, torch.Tensor)


# ------------------------------------------------------------------------------------- ReLU6 and leftovers


class Activations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act6 = nn.ReLU6()
        self.leaky = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.act6(x), F.relu6(x), self.leaky(x), x.clamp(min=0), F.relu(x)])


def test_relu6_opt_in_is_a_staircase_capped_at_6_and_the_rest_is_listed():
    x = torch.linspace(-3, 12, 301)
    model = Activations()
    plan = plan_activations(model).format()
    assert "Stays float (4)" in plan and "act6 (nn.ReLU6): ReLU6 is not in `targets`" in plan
    assert "leaky (nn.LeakyReLU)" in plan and "clamp(min=0) in <root>.forward" in plan
    default = copy.deepcopy(model)
    lightning_ste.quantize_activations_(default, bits=2)
    assert "targets" not in recipes_on(default)[0]["arguments"]  # recipes/state keys as before
    out = default(x)
    assert torch.equal(out[0], F.relu6(x)) and torch.equal(out[1], F.relu6(x))  # default: ReLU6 untouched
    names = lightning_ste.quantize_activations_(model, bits=2, alpha=0.5, targets=("relu", "relu6"))
    assert sorted(names) == ["act6", "relu_fx_0", "relu_fx_1"]
    out = model(x)
    staircase6 = torch.clamp(torch.ceil(x / 2.0), 0, 3) * 2.0  # L = 3 levels of 6 / 3 = 2 above zero
    assert torch.equal(out[0], staircase6) and torch.equal(out[1], staircase6)
    assert out[0].max() == 6
    assert torch.equal(out[4], torch.clamp(torch.ceil(x / 0.5), 0, 3) * 0.5)  # ReLU sites keep `alpha`
    with pytest.raises(
        ValueError, match=r"`targets` must be a non-empty list of 'relu', 'relu6', got \('gelu',\)"
    ):
        lightning_ste.QuantizeActivations(targets=("gelu",))


def test_weight_plan_ends_with_what_stays_float():
    model = nn.Sequential(
        nn.Embedding(10, 6),
        nn.ConvTranspose1d(6, 6, 1),
        nn.Linear(6, 6),
        nn.LayerNorm(6),
        nn.MultiheadAttention(6, 2),
    )
    model[2].weight = model[0].weight
    text = plan_weights(model, layer_types=(nn.Linear,)).format()
    tail = text.split("Stays float")[1]
    assert "0.weight (Embedding): tied to the latent W of a quantized layer" in tail
    assert "1.weight (ConvTranspose1d): ConvTranspose1d is not in `layer_types`" in tail
    assert "4.in_proj_weight (MultiheadAttention): a bare Parameter" in tail
    assert "1 normalisation layer(s)" in tail
