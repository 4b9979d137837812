"""Preemption of a real ``lightning-ste fit`` run: SIGKILL mid-epoch, then ``--ckpt_path last.ckpt``, ends
bit-identical to an uninterrupted run (weights and metrics), with no "not resumable" warning; SIGTERM saves a
checkpoint at the step it arrives and the run resumed from it is bit-identical too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_ste.recipes.cli import EXIT_SIGTERM, main, run_cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "synthetic" / "orthogonal_subspaces.yaml")
STEPS_PER_EPOCH = 10  # n_train 200 / batch 20; 2 epochs = 20 steps
KILL_STEP = 15  # epoch 1, batch 5: after the step-12 checkpoint, before step 16's


def fit_args(ckpt_dir: Path) -> list[str]:
    return [
        "fit",
        "--config",
        RECIPE,
        "--trainer.logger",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.deterministic",
        "true",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.max_epochs",
        "2",
        "--data.n_train",
        "200",
        "--data.n_val",
        "100",
        "--data.batch_size",
        "20",
        "--model.arch_kwargs.hidden",
        "32",
        "--checkpoint.dirpath",
        str(ckpt_dir),
        "--checkpoint.monitor",
        "null",
        "--checkpoint.every_n_train_steps",
        "4",
        "--checkpoint.save_top_k",
        "0",
    ]


def fit_in_process(args: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(args)
    state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in cli.model.state_dict().items()}
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    return state, dict(cli.final_metrics), [str(w.message) for w in caught]


def signal_at(step: int, signum: int) -> str:
    """The ``--trainer.callbacks+=`` argument of a callback that sends ``signum`` to its process at ``step``."""
    callback = {
        "class_path": "preempt_callbacks.SignalAt",
        "init_args": {"step": step, "signum": int(signum)},
    }
    return f"--trainer.callbacks+={json.dumps(callback)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    state, metrics, _ = fit_in_process(fit_args(tmp_path_factory.mktemp("full")))
    return state, metrics


def assert_same_run(resumed: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    (state, metrics), (ref_state, ref_metrics) = resumed, reference
    assert state.keys() == ref_state.keys()
    differing = [
        k
        for k, v in ref_state.items()
        if not (torch.equal(state[k], v) if torch.is_tensor(v) else state[k] == v)
    ]
    assert not differing, f"not bit-identical after resume: {differing}"
    assert metrics == ref_metrics and {"val/acc", "val/loss"} <= metrics.keys()


def resume_and_compare(ckpt_dir: Path, uninterrupted: tuple[dict, dict]) -> None:
    last = ckpt_dir / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert 0 < saved["global_step"] % STEPS_PER_EPOCH  # mid-epoch
    position = saved["OrthogonalSubspacesDataModule"]["train_loader"]["served"]
    assert position == saved["global_step"] % STEPS_PER_EPOCH
    state, metrics, messages = fit_in_process([*fit_args(ckpt_dir), "--ckpt_path", str(last)])
    assert not [m for m in messages if "not resumable" in m], messages
    assert_same_run((state, metrics), uninterrupted)


def test_sigkilled_cli_run_resumes_bit_identically(tmp_path: Path, uninterrupted: tuple[dict, dict]) -> None:
    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_ste.recipes.cli",
            *fit_args(ckpt_dir),
            signal_at(KILL_STEP, signal.SIGKILL),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 12  # the last every-4-steps checkpoint before the kill
    resume_and_compare(ckpt_dir, uninterrupted)


def test_sigterm_saves_the_step_it_arrives_in_and_exits_143(
    tmp_path: Path, uninterrupted: tuple[dict, dict], capsys: pytest.CaptureFixture
) -> None:
    # In this process: Lightning's SIGTERM handler is real; the signal is sent by the run itself at step 15.
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_:
        main([*fit_args(ckpt_dir), signal_at(KILL_STEP, signal.SIGTERM)])
    assert exit_.value.code == EXIT_SIGTERM
    last = ckpt_dir / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == KILL_STEP
    assert f"--ckpt_path {last}" in capsys.readouterr().err
    resume_and_compare(ckpt_dir, uninterrupted)


def test_recipe_loader_resumes_mid_epoch_and_at_epoch_end_in_the_uninterrupted_order() -> None:
    from lightning_ste.recipes.data import OrthogonalSubspacesDataModule

    def module() -> OrthogonalSubspacesDataModule:
        dm = OrthogonalSubspacesDataModule(num_classes=4, dim=2, n_train=50, n_val=10, batch_size=8)
        dm.setup("fit")
        return dm

    torch.manual_seed(3)
    dm = module()
    loader = dm.train_dataloader()
    epochs, states = [], []
    for _ in range(2):
        batches = []
        for batch in loader:
            batches.append(batch[1])
            states.append(loader.state_dict())
        epochs.append(batches)
    assert len(epochs[0]) == 7 and not all(torch.equal(a, b) for a, b in zip(*epochs))
    # The first pass is the order a plain shuffled DataLoader draws from the same global seed.
    torch.manual_seed(3)
    plain = list(torch.utils.data.DataLoader(module().train_data[1], batch_size=8, shuffle=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, epochs[0]))

    # Mid-epoch (as Lightning hands it to the loader): the rest of that epoch, then the next epoch.
    torch.manual_seed(99)  # another global RNG state: the saved state alone decides the order
    resumed = module().train_dataloader()
    resumed.load_state_dict(states[2])  # after 3 batches of epoch 0
    rest = [y for _, y in resumed]
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, epochs[0][3:]))
    assert all(torch.equal(a, b) for (_, a), b in zip(resumed, epochs[1]))

    # Epoch end (Lightning hands the state only to the data module): the next epoch's order.
    dm2 = module()
    dm2.load_state_dict({"train_loader": states[6]})
    assert states[6]["served"] == 0
    assert all(torch.equal(a, b) for (_, a), b in zip(dm2.train_dataloader(), epochs[1]))


def test_distributed_sampler_injection_keeps_the_loader_resumable() -> None:
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from lightning_ste.recipes.data.common import SkippingBatchSampler, tensor_loader

    x, y = torch.randn(40, 3), torch.arange(40)
    loader = tensor_loader(x, y, 4, shuffle=True)
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    ddp = _update_dataloader(loader, sampler)  # what Lightning does under DDP
    assert type(ddp) is type(loader) and isinstance(ddp.batch_sampler, SkippingBatchSampler)
    full = [b[1] for b in ddp]
    ddp.load_state_dict({"generator": None, "served": 2})
    assert [b[1].tolist() for b in ddp] == [b.tolist() for b in full[2:]]
