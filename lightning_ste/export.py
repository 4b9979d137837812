"""Ship a quantized model: a frozen inference copy, ONNX export, and a file with weights at their bit-width.

- :func:`freeze`: an eval copy with constant q(W) weights and constant-alpha quantized ReLUs (plain tensor
  ops, so it exports to ONNX and TorchScript), giving the same outputs.
- :func:`to_onnx`: the frozen model as an ONNX file.
- :func:`save_packed` / :func:`load_packed`: 1-bit weights as sign bits packed 8 per byte, ternary as 2-bit
  codes, b-bit as b-bit codes, each with its float scale(s) (BCGD19); everything else in float. File layout:
  a ``torch.save`` of ``{"format", "version", "module": the frozen module with empty quantized weights,
  "packed": {parameter name: {"encoding", "bits", "data": uint8 bytes, "scale", "shape", "dtype"}}}``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_ste import _compat
from lightning_ste.bit_summary import parametrization_chains
from lightning_ste.config import ALPHA_FLOOR, ROUNDINGS, check_bits, check_choice
from lightning_ste.inspect import quantized_layers, weight_quantizer
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

__all__ = [
    "FrozenQuantReLU",
    "freeze",
    "load_packed",
    "pack_bits",
    "save_packed",
    "to_onnx",
    "unpack_bits",
]

PACKED_FORMAT = "lightning_ste.packed"
PACKED_VERSION = 1
# Root attribute of a frozen model: {parameter name: quantizer settings} of the weights freeze() quantized.
_FROZEN_ATTR = "_lightning_ste_frozen_weights"


class FrozenQuantReLU(nn.Module):
    """Inference-only b-bit quantized ReLU with constant alpha: ``alpha * clamp(ceil(x / alpha), 0, L)``.

    The forward of :class:`~lightning_ste.QuantReLU` (docs/math.md §1; YLZ19, BCGD19) written with plain tensor ops
    (div, ceil or round, clamp, mul), so tracing exporters see ordinary operators; alpha is a buffer.
    """

    alpha: Tensor

    def __init__(self, bits: int, alpha: float | Tensor, rounding: str = "ceil") -> None:
        super().__init__()
        check_bits(bits)
        check_choice("rounding", rounding, ROUNDINGS)
        self.bits, self.rounding = bits, rounding
        value = torch.as_tensor(alpha, dtype=torch.float32).detach().clone().clamp_min(ALPHA_FLOOR)
        self.register_buffer("alpha", value)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @classmethod
    def from_quant_relu(cls, module: QuantReLU) -> FrozenQuantReLU:
        """Freeze a :class:`QuantReLU` at its current alpha."""
        frozen = cls(module.bits, module.alpha.detach().float().cpu(), module.rounding)
        return frozen.to(module.alpha.device)

    def forward(self, x: Tensor) -> Tensor:
        # Same operations, in the same order and precision, as the training forward (quantizers/activation.py).
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        a = self.alpha.to(compute.dtype)
        k = torch.div(compute, a)
        k = torch.ceil(k) if self.rounding == "ceil" else torch.round(k)
        y = torch.clamp(k, 0, self.levels) * a
        y = torch.where(torch.isinf(compute), compute, y)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha):.4g}, rounding={self.rounding}"


@torch.no_grad()
def _quantizer_settings(quantizer: WeightQuantizer) -> dict[str, Any]:
    return {
        "bits": quantizer.bits,
        "per_channel": quantizer.per_channel,
        "ternary_scale": quantizer.ternary_scale,
        "binary_scale": quantizer.binary_scale,
    }


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def _unparametrize(layers: list[nn.Module]) -> None:
    """``remove_parametrizations(..., leave_parametrized=True)`` for every tensor of deep-copied layers.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the tensor's property from the layer's
    class, and a deep copy shares that class with the original, which would then lose its weight; so the
    class is swapped back here without touching it. Every value is computed before anything changes (a
    latent weight shared by two layers must not be quantized twice), and layers sharing a latent weight
    share the new parameter when their values agree; a float layer tied to the latent keeps the latent.
    """
    values = [
        (layer, name, getattr(layer, name).detach(), getattr(chain, "original", None))
        for layer in layers
        for name, chain in parametrization_chains(layer).items()
    ]
    shared: dict[int, list[nn.Parameter]] = {}
    for layer, name, value, original in values:
        if original is not None and not isinstance(original, nn.Parameter):
            tensor: Tensor = value  # a parametrized buffer stays a buffer
        else:
            candidates = shared.setdefault(id(original), []) if original is not None else []
            found = next((p for p in candidates if torch.equal(p, value)), None)
            if found is None:
                found = nn.Parameter(value, requires_grad=False)
                candidates.append(found)
            tensor = found
        _compat.drop_parametrized_class(layer)
        if isinstance(tensor, nn.Parameter):
            layer.register_parameter(name, tensor)
        else:
            layer.register_buffer(name, tensor)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Eval-only deep copy with constant quantized weights and fixed quantized ReLUs, same outputs.

    Every parametrization is removed as ``leave_parametrized=True`` does (so ``weight = q(W)`` of the final
    latent weights, as BCGD19 evaluates), every :class:`~lightning_ste.QuantReLU` becomes a
    :class:`FrozenQuantReLU` holding alpha as a buffer, every parameter gets ``requires_grad=False`` and the
    copy is put in eval mode. ``model`` itself is not changed. Freezing a frozen model copies it.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    frozen = copy.deepcopy(model)
    weights: dict[str, dict[str, Any]] = dict(getattr(frozen, _FROZEN_ATTR, {}))
    parametrized = []
    for name, layer in frozen.named_modules():
        if parametrize.is_parametrized(layer):
            parametrized.append(layer)
            quantizer = weight_quantizer(layer)
            if quantizer is not None:
                weights[f"{name}.weight" if name else "weight"] = _quantizer_settings(quantizer)
    _unparametrize(parametrized)
    if isinstance(frozen, QuantReLU):
        return FrozenQuantReLU.from_quant_relu(frozen).eval()
    replaced: dict[int, FrozenQuantReLU] = {}  # a QuantReLU shared by several parents stays shared
    for name, module in list(frozen.named_modules(remove_duplicate=False)):
        if isinstance(module, QuantReLU):
            if id(module) not in replaced:
                replaced[id(module)] = FrozenQuantReLU.from_quant_relu(module)
            _set_submodule(frozen, name, replaced[id(module)])
    for p in frozen.parameters():
        p.requires_grad_(False)
    setattr(frozen, _FROZEN_ATTR, weights)
    return frozen.eval()


def to_onnx(
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...], path: str | os.PathLike, **kwargs: Any
):
    """Export :func:`freeze` ``(model)`` to an ONNX file at ``path``; returns the path.

    Uses the TorchScript exporter (``dynamo=False``) and falls back to the dynamo exporter if that one is
    unavailable. Defaults: opset 17, input ``"input"``, output ``"output"``, dynamic batch dimension;
    ``kwargs`` go to :func:`torch.onnx.export` and override them.
    """
    frozen = freeze(model)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    options: dict[str, Any] = {"opset_version": 17, "input_names": ["input"], "output_names": ["output"]}
    if len(args) == 1:
        options["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    options.update(kwargs)
    path = Path(path)
    try:
        torch.onnx.export(frozen, args, str(path), dynamo=False, **options)
    except (RuntimeError, TypeError, NotImplementedError) as legacy_error:
        options.pop("dynamic_axes", None)
        try:
            torch.onnx.export(frozen, args, str(path), dynamo=True, **options)
        except Exception as dynamo_error:
            raise dynamo_error from legacy_error
    return path


# ------------------------------------------------------------------------------------------ packing


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers ``< 2**bits`` into bytes, least significant bit first (uint8, 1-D)."""
    check_bits(bits)
    v = values.detach().flatten().to(torch.uint8).cpu().numpy()
    if bits > 1:
        v = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(v.reshape(-1), bitorder="little"))


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` ``bits``-bit integers (int64, 1-D)."""
    check_bits(bits)
    stream = np.unpackbits(data.cpu().numpy(), count=count * bits, bitorder="little")
    if bits == 1:
        return torch.from_numpy(stream.astype(np.int64))
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    return torch.from_numpy(stream.reshape(count, bits).astype(np.int64) @ weights)


def _pack_codes(codes: Tensor, bits: int) -> dict[str, Any]:
    """Codes -> a packed blob: 1-bit signs (bit = 1 for +1), else codes + 2**(b-1) - 1 in b bits."""
    if bits == 1:
        # sign(0) = 0 (BCGD19 code): an exact zero latent weight, rare, is listed by index (4 bytes each);
        # a layer with many (more than 1 in 32) is cheaper stored as ternary codes.
        zeros = (codes == 0).nonzero().flatten()
        if zeros.numel() * 32 < codes.numel():
            index_dtype = torch.int32 if codes.numel() < 2**31 else torch.int64
            blob = {"encoding": "sign", "bits": 1, "data": pack_bits(codes > 0, 1)}
            return {**blob, "zeros": zeros.to(index_dtype)}
        bits = 2
    offset = 2 ** (bits - 1) - 1
    return {"encoding": "offset", "bits": bits, "data": pack_bits((codes + offset).round(), bits)}


def _unpack_codes(blob: dict[str, Any], count: int) -> Tensor:
    values = unpack_bits(blob["data"], blob["bits"], count)
    if blob["encoding"] == "sign":
        codes = values * 2 - 1
        codes[blob["zeros"].long()] = 0
        return codes
    return values - (2 ** (blob["bits"] - 1) - 1)


def _codes_from_frozen(q: Tensor, settings: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Recover (codes, scale) of a frozen q(W): the largest |code| is 1 (bits <= 2) or 2**(b-1)-1."""
    bits = settings["bits"]
    top = 1 if bits <= 2 else 2 ** (bits - 1) - 1
    dims = tuple(range(1, q.dim())) if settings["per_channel"] and q.dim() > 1 else None
    amax = q.abs().amax() if dims is None else q.abs().amax(dim=dims, keepdim=True)
    scale = amax / top
    codes = torch.where(scale > 0, q / scale.clamp_min(torch.finfo(q.dtype).tiny), 0).round()
    return codes, scale


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def save_packed(model: nn.Module, path: str | os.PathLike) -> int:
    """Save ``model`` with quantized weights at their bit-width; returns (and logs) the file size in bytes.

    1-bit weights are stored as sign bits packed 8 per byte, ternary as 2-bit codes, b-bit as b-bit codes,
    each with its float scale(s) (the codes and scales of :func:`~lightning_ste.functional.weight_codes`);
    other tensors stay float. The file is a ``torch.save`` of the :func:`freeze` d module whose quantized
    weights are replaced by empty tensors, plus the packed blobs; :func:`load_packed` restores it. Accepts
    the training model (weights parametrized by :class:`~lightning_ste.WeightQuantizer`) or a frozen one.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    latent = {
        (f"{q.name}.weight" if q.name else "weight"): (q.latent, q.quantizer) for q in quantized_layers(model)
    }
    frozen = freeze(model)
    fp32_bytes = _weight_bytes(frozen)
    packed: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for pname, settings in getattr(frozen, _FROZEN_ATTR).items():
        param = frozen.get_parameter(pname)
        if id(param) in seen:
            continue  # a weight shared with a layer packed already: restoring that one restores both
        seen.add(id(param))
        if pname in latent:
            w, quantizer = latent[pname]
            codes, scale = quantizer.weight_codes(w.detach())
        else:
            codes, scale = _codes_from_frozen(param.detach(), settings)
        blob = _pack_codes(codes.detach().flatten().cpu(), settings["bits"])
        blob.update(shape=tuple(param.shape), dtype=param.dtype, scale=scale.detach().cpu().clone())
        packed[pname] = blob
        # Shared (tied) parameters are one object, so emptying it empties every alias.
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    path = Path(path)
    torch.save({"format": PACKED_FORMAT, "version": PACKED_VERSION, "module": frozen, "packed": packed}, path)
    size = path.stat().st_size
    rank_zero_info(
        f"lightning_ste: saved packed model to {path}: {size / 1e6:.3f} MB "
        f"({len(packed)} packed weight tensors; fp32 parameters would take {fp32_bytes / 1e6:.3f} MB)"
    )
    return size


def load_packed(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a :func:`save_packed` file: the frozen module with q(W) = codes * scale restored, in eval mode.

    The file holds a pickled module (``torch.load(weights_only=False)``): load only files you trust.
    """
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or obj.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path} is not a lightning_ste packed model file")
    if obj.get("version") != PACKED_VERSION:
        raise ValueError(f"{path}: unsupported packed format version {obj.get('version')!r}")
    module: nn.Module = obj["module"]
    # Strict: every packed blob fills a parameter, and every emptied quantized weight gets its blob back.
    params = dict(module.named_parameters(remove_duplicate=False))
    unexpected = [name for name in obj["packed"] if name not in params]
    restored = {id(params[name]) for name in obj["packed"] if name in params}
    missing = [
        name
        for name in getattr(module, _FROZEN_ATTR, {})
        if name in params and params[name].numel() == 0 and id(params[name]) not in restored
    ]
    if missing or unexpected:
        raise ValueError(
            f"{path}: packed weights missing for {missing}; packed weights for no parameter {unexpected}"
        )
    with torch.no_grad():
        for pname, blob in obj["packed"].items():
            count = 1
            for d in blob["shape"]:
                count *= d
            codes = _unpack_codes(blob, count).to(blob["dtype"]).view(blob["shape"])
            # Same product as WeightQuantizer's forward, so the weights are bit-identical.
            module.get_parameter(pname).data = codes * blob["scale"].to(blob["dtype"])
    return module.to(map_location).eval()
