"""Each private torch/Lightning access of ``lightning_ste._compat`` against the real library.

A release that renames or changes one of these internals fails here, on the function that broke.
"""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from lightning_ste import _compat


def test_slots_are_the_live_dicts():
    lin = nn.Linear(3, 2)
    params = _compat.parameter_slots(lin)
    assert list(params) == ["weight", "bias"]
    new = nn.Parameter(torch.ones(2, 3))
    params["weight"] = new  # a write through the dict is a write to the module
    assert lin.weight is new
    bn = nn.BatchNorm1d(2)
    assert set(_compat.buffer_slots(bn)) == {"running_mean", "running_var", "num_batches_tracked"}
    relu = nn.ReLU()
    seq = nn.Sequential()
    seq.add_module("a", relu)
    seq.add_module("b", relu)
    assert list(_compat.module_slots(seq)) == ["a", "b"]  # named_children would list the shared child once
    assert [n for n, _ in seq.named_children()] == ["a"]


def test_non_persistent_buffers():
    m = nn.Module()
    m.register_buffer("kept", torch.zeros(1))
    m.register_buffer("scratch", torch.zeros(1), persistent=False)
    assert _compat.non_persistent_buffers(m) == {"scratch"}
    assert set(m.state_dict()) == {"kept"}


def test_norm_layer_types_cover_torch_norms():
    types = _compat.norm_layer_types()
    for layer in (
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2),
        nn.InstanceNorm2d(2),
        nn.LayerNorm(2),
        nn.GroupNorm(1, 2),
    ):
        assert isinstance(layer, types), type(layer).__name__
    assert not isinstance(nn.Linear(2, 2), types)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_drop_parametrized_class_leaves_the_original_parametrized():
    lin = nn.Linear(2, 2)
    parametrize.register_parametrization(lin, "weight", _Double())
    clone = copy.deepcopy(lin)
    assert type(clone) is type(lin) and type(lin) is not nn.Linear  # the copy shares the generated class
    _compat.drop_parametrized_class(clone)
    assert type(clone) is nn.Linear and "parametrizations" not in dict(clone.named_children())
    # The original keeps its class and its property: its weight is still 2 * latent.
    assert torch.equal(lin.weight, 2 * lin.parametrizations.weight.original)


def test_tensor_version_counts_in_place_ops():
    t = torch.zeros(3)
    before = _compat.tensor_version(t)
    t.add_(1)
    t[0] = 5
    assert _compat.tensor_version(t) == before + 2
    t + 1  # out of place: no bump
    assert _compat.tensor_version(t) == before + 2


def test_storage_use_count_sees_other_owners():
    t = torch.zeros(4)
    alone = _compat.storage_use_count(t)
    if alone is None:
        pytest.skip("this torch has no storage use count")
    assert alone == 2  # the tensor and the UntypedStorage object that asks (what the quantizers rely on)
    view = t.view(2, 2)
    assert _compat.storage_use_count(t) == 3
    del view
    assert _compat.storage_use_count(t) == 2


def test_foreach_ops_match_per_tensor_ops():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    other = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    assert all(torch.equal(a, b.sign()) for a, b in zip(_compat.foreach_sign(ts), ts))
    assert all(torch.equal(a, b * 3) for a, b in zip(_compat.foreach_mul(ts, 3.0), ts))
    assert all(torch.equal(a, b * o) for a, b, o in zip(_compat.foreach_mul(ts, other), ts, other))
    norms = _compat.foreach_norm(ts, 1)
    assert all(torch.equal(n, b.abs().sum()) for n, b in zip(norms, ts))
    expect = [(b * 2 + o) / 4 for b, o in zip(ts, other)]
    work = [b.clone() for b in ts]
    _compat.foreach_mul_(work, 2.0)
    _compat.foreach_add_(work, other)
    _compat.foreach_div_(work, [4.0, 4.0])
    assert all(torch.equal(a, e) for a, e in zip(work, expect))


def test_fx_code_generation():
    fn = _compat.forward_from_source("def forward(self, x):\n    return torch.relu(x) + 1\n")
    fn.__globals__["torch"] = torch
    assert torch.equal(fn(None, torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0]))
    assert _compat.format_import_block({"torch": torch}).strip() == "import torch"


def test_cpp_build_directory_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _compat.cpp_build_directory("lightning_ste_probe") == os.path.join(
        str(tmp_path), "lightning_ste_probe"
    )


def test_compiled_forward_context_of_a_compiled_lightning_module():
    model = BoringModel()
    assert _compat.compiled_forward_context(model) is None
    restored = from_compiled(torch.compile(model))
    ctx = _compat.compiled_forward_context(restored)
    assert ctx is not None
    assert ctx["original_forward"].__func__ is BoringModel.forward and callable(ctx["dynamo_ctx"])


class _Probe(Callback):
    """Reads the internals during a real fit, where the package reads them."""

    def __init__(self) -> None:
        self.loader = self.transferred = self.trainer = None

    def setup(self, trainer, pl_module, stage):
        self.trainer = _compat.attached_trainer(pl_module)
        self.loader = _compat.stage_data_loader(trainer, "fit_loop")
        self.transferred = _compat.apply_batch_transfer(pl_module, torch.ones(2, 32))


class _Shifted(BoringModel):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch + 1


def test_lightning_internals_during_fit(tmp_path):
    model = _Shifted()
    assert _compat.attached_trainer(model) is None
    probe = _Probe()
    loader = DataLoader(RandomDataset(32, 8), batch_size=2)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=3, callbacks=[probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    assert probe.trainer is trainer
    assert probe.loader is loader
    assert torch.equal(probe.transferred, torch.full((2, 32), 2.0))  # the module's transfer hook ran
    assert _compat.batches_that_stepped(trainer) == 3
    fresh = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert _compat.stage_data_loader(fresh, "fit_loop") is None  # nothing given yet


def test_model_pruning_internals():
    lin = nn.Linear(2, 2)
    pruner = ModelPruning("l1_unstructured", parameters_to_prune=[(lin, "weight")])
    assert _compat.pruning_entries(pruner) == [(lin, "weight")]
    assert _compat.pruning_parameter_names(pruner) == ["weight", "bias"]
    assert _compat.pruning_original_layers(pruner) is None
    other = nn.Linear(2, 2)
    _compat.set_pruning_entries(pruner, [(other, "weight")])
    assert pruner.filter_parameters_to_prune([(other, "weight")]) == [(other, "weight")]
    assert _compat.pruning_entries(pruner) == [(other, "weight")]


def test_scaler_found_inf_is_the_flag_step_skips_on():
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    assert _compat.scaler_found_inf(scaler, opt) is None  # unscale_ has not run in this step
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.unscale_(opt)
    flag = _compat.scaler_found_inf(scaler, opt)
    assert flag is not None and float(flag) == 1.0
    scaler.step(opt)
    assert torch.equal(w.detach(), torch.ones(2))  # the step was skipped, as the flag said


class _Marker(Callback):
    pass


def test_lightning_cli_internals(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    class CLI(_compat.AroundSubcommand, LightningCLI):
        def around_subcommand(self, subcommand, run):
            self.seen = (subcommand, self.trainer.global_step)
            run()
            self.after = self.trainer.global_step

    args = [
        "fit",
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = CLI(BoringModel, args=args)
    assert cli.seen == ("fit", 0) and cli.after == 1  # the hook wrapped the whole run
    marker = _Marker()
    config = {"max_steps": 2, "logger": False, "callbacks": None}
    trainer = _compat.instantiate_cli_trainer(cli, config, [marker])
    assert isinstance(trainer, pl.Trainer) and trainer.max_steps == 2 and marker in trainer.callbacks
    names = _compat.parser_option_names(cli.parser)
    assert {"trainer.max_epochs", "trainer.fast_dev_run", "optimizer"} <= names


class _Stateful(Callback):
    def __init__(self, bits: int) -> None:
        self.bits = bits

    @property
    def state_key(self) -> str:
        return _compat.callback_state_key(self, bits=self.bits)

    def state_dict(self):
        return {"bits": self.bits}


def test_callback_state_key_is_the_key_lightning_files_state_under(tmp_path):
    assert _compat.callback_state_key(_Stateful(2), bits=2) == "_Stateful{'bits': 2}"
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=1, callbacks=[_Stateful(2), _Stateful(4)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    saved = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)["callbacks"]
    assert saved["_Stateful{'bits': 2}"] == {"bits": 2} and saved["_Stateful{'bits': 4}"] == {"bits": 4}
