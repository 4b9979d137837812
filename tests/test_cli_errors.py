"""The ``lightning-ste`` command speaks in one screen: each user error of the table below exits with status 2
and a short message naming the setting, the value and the fix; ``--debug`` / ``LIGHTNING_STE_DEBUG=1`` give the
traceback. Runs the real entry point (``main``) in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ste.recipes.cli import EXIT_USER_ERROR, RecipeError, main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def imagenet_without_class_folders(root: Path) -> Path:
    """``train/`` and ``val/`` hold the JPEGs directly: the common mistake of an unsorted ImageNet copy."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / "ILSVRC2012_val_00000001.JPEG")
    return root


def cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, substrings the message must contain: the setting, the value, the fix)."""
    twolayer = ["fit", "--config", str(RECIPES / "mnist" / "twolayer.yaml")]
    on_cpu = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.strategy",
        "auto",
        "--model.arch_kwargs",
        "{}",
    ]
    (tmp / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    return {
        "rejected argument": (
            [*twolayer, "--activations.bits", "9"],
            ["--activations.bits", "QuantizeActivations", "must be an int in 1..8", "got 9"],
        ),
        "missing init_from checkpoint": (
            ["fit", "--config", str(RECIPES / "mnist" / "lenet5_a2.yaml")],
            [
                "--model.init_from",
                "'runs/checkpoints/mnist-lenet5-float/last.ckpt'",
                "no such file",
                "train the float model first: `lightning-ste fit --config ",
                "recipes/mnist/lenet5_float.yaml`",
            ],
        ),
        "missing dataset": (
            [*twolayer, *QUIET, "--data.root", str(tmp / "empty"), "--data.download", "false"],
            ["MNIST not found", str(tmp / "empty"), "--data.root", "--data.download true"],
        ),
        "dataset laid out wrongly": (
            [
                "fit",
                "--config",
                str(RECIPES / "imagenet" / "resnet18_float.yaml"),
                *QUIET,
                *on_cpu,
                "--data.root",
                str(imagenet_without_class_folders(tmp / "imagenet")),
                "--data.num_workers",
                "0",
            ],
            [
                "ImageNet train/",
                str(tmp / "imagenet"),
                "<root>/train/<class>/<image>.JPEG",
                "<root>/val/<class>",
            ],
        ),
        "GPU recipe on a CPU-only machine": (
            ["fit", "--config", str(RECIPES / "imagenet" / "resnet18_w1a4.yaml"), "--data.root", str(tmp)],
            [
                "uses all GPUs",
                "devices: -1",
                "precision: 16-mixed",
                "--trainer.accelerator cpu --trainer.devices 1 --trainer.precision bf16-mixed",
            ],
        ),
        "unknown key on the command line": (
            [*twolayer, "--trainer.maxepochs", "2"],
            ["--trainer.maxepochs 2", "did you mean --trainer.max_epochs", "lightning-ste fit --help"],
        ),
        "unknown key in a recipe file": (
            [*twolayer, "--config", str(tmp / "typo.yaml")],
            ["'trainer.max_epoch'", "did you mean --trainer.max_epochs"],
        ),
    }


NAMES = [
    "rejected argument",
    "missing init_from checkpoint",
    "missing dataset",
    "dataset laid out wrongly",
    "GPU recipe on a CPU-only machine",
    "unknown key on the command line",
    "unknown key in a recipe file",
]


@pytest.mark.parametrize("name", NAMES)
def test_user_error_is_one_short_message(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if name == "GPU recipe on a CPU-only machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)  # relative recipe paths (runs/checkpoints/...) resolve here: nothing exists
    args, expected = cases(tmp_path)[name]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) < 15, err
    message = "\n".join(line for line in lines if line.startswith("lightning-ste: error:"))
    assert message, err
    missing = [s for s in expected if s not in message]
    assert not missing, f"{missing} not in: {message}"
    assert lines[-1] == "(the full traceback: add --debug or set LIGHTNING_STE_DEBUG=1)"


def test_debug_switch_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(RECIPES / "mnist" / "twolayer.yaml"), "--activations.bits", "9"]
    for switch in ("flag", "env"):
        if switch == "env":
            monkeypatch.setenv("LIGHTNING_STE_DEBUG", "1")
        with pytest.raises(RecipeError) as raised:
            main([*args, "--debug"] if switch == "flag" else args)
        # The whole chain is there: the package's own ValueError under jsonargparse's wrapper.
        causes = []
        exc: BaseException | None = raised.value
        while exc is not None:
            causes.append(exc)
            exc = exc.__cause__ or exc.__context__
        assert any(type(e) is ValueError and str(e) == "`bits` must be an int in 1..8, got 9" for e in causes)
        assert raised.value.__traceback__ is not None
