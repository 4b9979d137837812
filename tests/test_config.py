"""The typed configs: validated once, frozen, and ``to_dict()`` is the recipe format checkpoints already hold."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from lightning_ste.config import DEFAULT_LAYER_TYPES, ActivationQuantConfig, WeightQuantConfig


def test_activation_to_dict_is_the_stored_recipe_format():
    # The exact `arguments` of an activations recipe written by 0.1.0: old checkpoints must keep loading.
    stored = {
        "bits": 2,
        "ste": "relu",
        "alpha": 0.5,
        "alpha_grad": "ae",
        "alpha_lr_scale": 0.1,
        "rounding": "nearest",
        "include": ["features.*"],
        "exclude": None,
        "calibration_batches": 3,
    }
    config = ActivationQuantConfig.from_dict(stored)
    assert config.include == ("features.*",) and config.targets == ("relu",)
    assert config.to_dict() == stored
    assert ActivationQuantConfig(bits=2, targets=["relu6", "relu"]).to_dict()["targets"] == ["relu", "relu6"]
    assert "targets" not in ActivationQuantConfig().to_dict()  # the default is not written (old state keys)


def test_activation_values_are_normalised():
    config = ActivationQuantConfig(alpha=1, alpha_lr_scale=1, include="a", exclude=["b", "c"])
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert isinstance(config.alpha_lr_scale, float)
    assert config.include == ("a",) and config.exclude == ("b", "c")
    assert config == ActivationQuantConfig.from_dict(config.to_dict())
    assert hash(config) == hash(ActivationQuantConfig.from_dict(config.to_dict()))


def test_weight_to_dict_names_layer_types_and_reads_them_back():
    config = WeightQuantConfig(bits=2, per_channel=True, layer_types=[nn.Linear], exclude="head")
    stored = config.to_dict()
    assert stored == {
        "bits": 2,
        "include": None,
        "exclude": ["head"],
        "keep_first_last": False,
        "per_channel": True,
        "ternary_scale": "twn",
        "binary_scale": "mean",
        "layer_types": ["torch.nn.modules.linear.Linear"],
    }
    back = WeightQuantConfig.from_dict(stored)
    assert back == config and back.layer_types == (nn.Linear,)
    assert WeightQuantConfig().layer_types == DEFAULT_LAYER_TYPES
    assert config.quantizer_arguments == {
        "bits": 2,
        "per_channel": True,
        "ternary_scale": "twn",
        "binary_scale": "mean",
    }


def test_configs_are_frozen_and_replace_validates():
    config = ActivationQuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 2  # type: ignore[misc]
    assert config.replace(bits=2).bits == 2 and config.bits == 4
    with pytest.raises(ValueError, match=r"`bits` must be an int in 1\.\.8, got 0"):
        config.replace(bits=0)
    with pytest.raises(ValueError, match=r"unknown `ternary_scale` 'x'; allowed: twn, bcgd_code"):
        WeightQuantConfig().replace(ternary_scale="x")


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ActivationQuantConfig, {"alpha": "auto"}, "unknown `alpha` 'auto'"),
        (ActivationQuantConfig, {"alpha": 1e-4}, "at least the floor 0.001"),
        (ActivationQuantConfig, {"targets": "relu"}, "`targets` must be a non-empty list"),
        (ActivationQuantConfig, {"calibration_batches": 0}, "`calibration_batches` must be an int >= 1"),
        (ActivationQuantConfig, {"ste": "straight"}, "unknown `ste` 'straight'"),
        (ActivationQuantConfig, {"include": 3}, "`include` must be None, a glob pattern"),
        (WeightQuantConfig, {"per_channel": 1}, "`per_channel` must be a bool"),
        (WeightQuantConfig, {"keep_first_last": "yes"}, "`keep_first_last` must be a bool"),
        (WeightQuantConfig, {"layer_types": [int]}, "`layer_types` must be a non-empty tuple"),
        (WeightQuantConfig, {"binary_scale": "max"}, "unknown `binary_scale` 'max'"),
    ],
)
def test_bad_values_name_the_argument(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cls(**kwargs)


def test_from_dict_refuses_unknown_keys_and_of_refuses_both():
    with pytest.raises(ValueError, match=r"unknown WeightQuantConfig argument\(s\) \['rho'\]"):
        WeightQuantConfig.from_dict({"bits": 1, "rho": 0.1})
    config = WeightQuantConfig(bits=2)
    assert WeightQuantConfig.of(config) is config
    assert WeightQuantConfig.of(bits=3).bits == 3
    with pytest.raises(ValueError, match="pass either `config` or keyword arguments, not both"):
        WeightQuantConfig.of(config, bits=3)
    with pytest.raises(ValueError, match="`config` must be a WeightQuantConfig, got ActivationQuantConfig"):
        WeightQuantConfig.of(ActivationQuantConfig())  # type: ignore[arg-type]
