"""The ``lightning-ste`` command: recipe + overrides, final table, offline W&B without prompting, figures."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.utils import cpp_extension

from lightning_ste import QuantReLU
from lightning_ste.recipes.cli import ensure_wandb_does_not_prompt, format_metrics_table, run_cli
from lightning_ste.recipes.data.synthetic import teacher_student
from lightning_ste.recipes.figures import one_step_losses

REPO = Path(__file__).resolve().parents[1]
TWOLAYER = str(REPO / "recipes" / "mnist" / "twolayer.yaml")
# CPU, no progress bar, no model summary
QUIET_CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def small_mnist(mnist_root: Path, tmp_path: Path) -> list[str]:
    return [
        "--data.root",
        str(mnist_root),
        "--data.subset",
        "512",
        "--data.val_subset",
        "256",
        *QUIET_CPU,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
    ]


def test_console_script_fit_with_overrides_prints_table_and_never_prompts(
    mnist_root: Path, tmp_path: Path
) -> None:
    # No credentials anywhere: no API key, a HOME without .netrc, no WANDB_MODE. stdin closed: a prompt would fail.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path)
    # Keep the on-disk cache of the package's compiled CPU kernels (under the real HOME by default).
    env["TORCH_EXTENSIONS_DIR"] = os.path.dirname(cpp_extension._get_build_directory("lightning_ste", False))
    env["PYTHONPATH"] = str(REPO)  # the checkout's code, as `lightning-ste` runs it after `pip install .`
    cmd = [
        sys.executable,
        "-m",
        "lightning_ste.recipes.cli",
        "fit",
        "--config",
        TWOLAYER,
        *small_mnist(mnist_root, tmp_path),
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.log_every_n_steps",
        "1",
        "--activations.ste",
        "identity",
        "--model.lr",
        "0.05",
        "--model.arch_kwargs.hidden",
        "64",
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B runs offline" in proc.stderr
    assert "args parameter is intended" not in proc.stderr  # the command line is handed to LightningCLI once
    out = proc.stdout
    assert "Final validation metrics (epoch 1, step 8)" in out
    assert "| val/acc " in out and "| val/loss " in out
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    saved = yaml.safe_load((runs[0] / "files" / "lightning_ste_config.yaml").read_text())
    assert saved["activations"]["init_args"]["ste"] == "identity"
    assert saved["model"]["init_args"]["lr"] == 0.05
    assert saved["model"]["init_args"]["arch_kwargs"]["hidden"] == 64
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_fast_dev_run_in_process_then_validate_from_checkpoint(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = [
        "--config",
        TWOLAYER,
        *small_mnist(mnist_root, tmp_path),
        "--activations.ste",
        "log_tailed_relu",
    ]
    cli = run_cli(["fit", *common, "--trainer.fast_dev_run", "2"])
    quant = [m for m in cli.model.modules() if isinstance(m, QuantReLU)]
    assert len(quant) == 1 and quant[0].ste == "log_tailed_relu" and quant[0].bits == 2
    out = capsys.readouterr().out
    assert "Final validation metrics" in out and "| val/acc " in out

    # A real (non fast-dev) step to get a checkpoint, then `validate` rebuilds the quantized model from it.
    cli = run_cli(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    fitted = cli.final_metrics["val/acc"]
    cli = run_cli(["validate", *common, "--ckpt_path", str(last)])
    assert cli.trainer.callback_metrics["val/acc"].item() == pytest.approx(fitted, abs=1e-6)


def test_wandb_mode_follows_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert ensure_wandb_does_not_prompt() == "offline" and os.environ["WANDB_MODE"] == "offline"

    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert ensure_wandb_does_not_prompt() is None and "WANDB_MODE" not in os.environ

    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert ensure_wandb_does_not_prompt() is None and "WANDB_MODE" not in os.environ

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_wandb_does_not_prompt() is None and os.environ["WANDB_MODE"] == "disabled"


def test_metrics_table_lists_names_as_logged() -> None:
    table = format_metrics_table({"val/loss": 0.25, "val/acc": torch.tensor(0.991)}, "T")
    lines = table.splitlines()
    assert lines[0] == "T"
    assert "| val/acc  | 0.9910 |" in lines and "| val/loss | 0.2500 |" in lines
    assert format_metrics_table({}, "T") == "T: none logged"


def test_figure_command_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "fig1.png"
    run_cli(["figure", "ylz19-fig1", "--out", str(out), "--sample-sizes", "10", "50", "1000"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coarse_gradient_step_is_descent_for_monotone_stes_on_many_samples() -> None:
    # YLZ19 Fig. 1: with 1000 samples a small step along the negative coarse gradient lowers the loss.
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(10, generator=g, dtype=torch.float64)
    w_star /= w_star.norm()
    v_star = torch.randn(20, generator=g, dtype=torch.float64)
    z, y = teacher_student(w_star, v_star, 1000, g)
    v0, w0 = (
        torch.randn(20, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    etas = torch.tensor([0.0, 1e-3, 1e-2], dtype=torch.float64)
    for ste in ("relu", "clipped_relu"):
        _, losses = one_step_losses(z, y, v0, w0, ste, etas)
        assert losses[1] < losses[0] and losses[2] < losses[0]


def test_help_lists_subcommands_and_recipes_without_lightning_warning() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ste.recipes.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(s in proc.stdout for s in ("fit", "validate", "test", "predict"))
    assert "args parameter is intended" not in proc.stdout + proc.stderr
    listing = proc.stdout[proc.stdout.index("Recipes (lightning-ste fit --config RECIPE") :]
    row = next(line for line in listing.splitlines() if "recipes/imagenet/resnet18_w1a4.yaml " in line)
    assert "BCGD19 ImageNet: torchvision ResNet-18" in row


def test_recipes_command_lists_every_recipe_with_its_description(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert run_cli(["recipes"]) is None
    lines = capsys.readouterr().out.splitlines()
    # The recipes, not the shared base files they name (under recipes/_base/).
    recipes = [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if "_base" not in p.parts]
    assert len(lines) == 1 + len(recipes)
    for line, path in zip(lines[1:], recipes):
        name, description = line.split(maxsplit=1)
        assert name == path.relative_to(REPO).as_posix()
        first_comment = path.read_text().splitlines()[0].lstrip("# ")
        assert description.rstrip(".") and first_comment.startswith(description.removesuffix("...").rstrip())


def test_recipe_without_logger_trains_and_lightning_sees_the_command_line_once(
    mnist_root: Path, tmp_path: Path
) -> None:
    # The recipe's LearningRateMonitor needs a logger: without one it is left out instead of failing the run.
    args = [
        "fit",
        "--config",
        TWOLAYER,
        *small_mnist(mnist_root, tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    args.remove("--trainer.logger.init_args.save_dir")
    args.remove(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(args)
    assert cli.trainer.loggers == [] and cli.trainer.global_step == 2
    assert not any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
    assert "val/acc" in cli.final_metrics
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]


def test_compile_flag_compiles_the_converted_model(tmp_path: Path) -> None:
    torch._dynamo.reset()
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "synthetic" / "orthogonal_subspaces.yaml"),
        "--trainer.logger",
        "false",
        *QUIET_CPU,
        "--trainer.fast_dev_run",
        "1",
        "--trainer.limit_val_batches",
        "0",  # training only: eval mode would compile the forward a second time
        "--data.n_train",
        "100",
        "--model.arch_kwargs.hidden",
        "16",
        "--checkpoint.dirpath",
        str(tmp_path),
    ]
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.append(gm.code)
        return gm.forward

    torch._dynamo.list_backends()  # registers the built-in backends before ours
    torch._dynamo.register_backend(backend, name="lightning_ste_test_recorder")
    cli = run_cli([*args, "--compile", "lightning_ste_test_recorder"])
    # Whole-network graphs traced after conversion: the QuantReLU's alpha is an input of each.
    assert seen and all("net_modules_relu_buffers_alpha" in c and "fc1" in c and "fc2" in c for c in seen), (
        seen
    )
    assert any(isinstance(m, QuantReLU) for m in cli.model.modules())
    assert cli.trainer.global_step == 1 and "forward" not in vars(cli.model)  # eager again afterwards
    torch._dynamo.reset()


def effective_config(recipe: Path, capsys: pytest.CaptureFixture) -> dict:
    """The config the CLI reads for ``recipe`` (the base files it names, then the recipe): ``--print_config``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    assert not done.value.code
    return yaml.safe_load(capsys.readouterr().out)


def test_recipes_for_gpus_autotune_cudnn_and_checkpoint_every_n_steps(capsys: pytest.CaptureFixture) -> None:
    for path in [
        *(REPO / "recipes" / "cifar10").glob("*.yaml"),
        *(REPO / "recipes" / "imagenet").glob("*.yaml"),
    ]:
        trainer = effective_config(path, capsys)["trainer"]
        assert trainer["benchmark"] is True, path
        steps = [
            c["init_args"]
            for c in trainer["callbacks"]
            if c["class_path"].endswith("ModelCheckpoint") and c["init_args"].get("every_n_train_steps")
        ]
        assert len(steps) == 1 and steps[0]["save_last"] is True, path
