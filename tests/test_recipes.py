"""Every recipe parses and trains end to end on CPU on small data, logging to an offline W&B run.

Small data: a real MNIST subset, a generated CIFAR-10-format folder, a generated ImageFolder tree of JPEGs.
Each run is one epoch of two training batches and one validation batch (the size of ``fast_dev_run=2``, but
with the logger kept, so that the W&B run files can be checked for the logged metrics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wandb_run_file import finished_run_records, history_rows

from lightning_ste import QuantReLU
from lightning_ste.recipe import recipes_on
from lightning_ste.recipes.cli import run_cli
from lightning_ste.recipes.data.cifar10 import write_cifar10
from lightning_ste.recipes.models import Classifier

REPO = Path(__file__).resolve().parents[1]
# The recipes, not the shared base files they name (under recipes/_base/).
RECIPES = sorted(
    p.relative_to(REPO / "recipes").as_posix()
    for p in (REPO / "recipes").rglob("*.yaml")
    if "_base" not in p.parts
)
EXPECTED = [
    "synthetic/orthogonal_subspaces.yaml",
    "synthetic/teacher_student.yaml",
    "mnist/twolayer.yaml",
    "mnist/lenet5_float.yaml",
    "mnist/lenet5_a2.yaml",
    "mnist/lenet5_a4.yaml",
    "cifar10/vgg11_float.yaml",
    "cifar10/vgg11_a2.yaml",
    "cifar10/vgg11_a4.yaml",
    "cifar10/resnet20_float.yaml",
    "cifar10/resnet20_a2.yaml",
    "cifar10/resnet20_a4.yaml",
    "cifar10/vgg11_w1a4_bcgd.yaml",
    "imagenet/resnet18_float.yaml",
    "imagenet/resnet18_w1a4.yaml",
    "imagenet/resnet18_w1a4_fp_first_last.yaml",
    "imagenet/resnet18_w1a4_binaryconnect.yaml",
]


def wandb_history_keys(run_file: Path) -> set[str]:
    """Metric names logged to an offline W&B run, read once W&B has finished writing its run file."""
    return {key for row in history_rows(finished_run_records(run_file)) for key in row}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (80, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 80).tolist())
    test = (rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 40).tolist())
    write_cifar10(root, train, test)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float state_dict per architecture, to exercise the quantized recipes' ``init_from``."""
    root = tmp_path_factory.mktemp("float")
    out = {}
    for arch, classes in (("lenet5", 10), ("vgg11", 10), ("resnet20", 10)):
        path = root / f"{arch}.ckpt"
        torch.save({"state_dict": Classifier(arch=arch, num_classes=classes).state_dict()}, path)
        out[arch] = path
    return out


def recipe_overrides(
    recipe: str, tmp: Path, mnist: Path, cifar: Path, imagenet: Path, ckpts: dict
) -> list[str]:
    args = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.precision",
        "32-true",
        "--trainer.logger.init_args.save_dir",
        str(tmp),
        "--checkpoint.dirpath",
        str(tmp / "ckpt"),
        "--checkpoint.save_top_k",
        "0",
    ]
    group, name = recipe.split("/")
    starts_from_float = "init_from" in (REPO / "recipes" / recipe).read_text()
    # CIFAR-10 and ImageNet read generated images: no worker processes, tiny batches.
    small_loaders = ["--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "4"]
    if name == "teacher_student.yaml":
        args += ["--data.batch_size", "500"]
    if group == "mnist":
        args += ["--data.root", str(mnist), "--data.subset", "256", "--data.val_subset", "128"]
        if starts_from_float:
            args += ["--model.init_from", str(ckpts["lenet5"])]
    elif group == "cifar10":
        args += ["--data.root", str(cifar), *small_loaders]
        if starts_from_float:
            args += ["--model.init_from", str(ckpts[name.split("_")[0]])]
        if name == "vgg11_w1a4_bcgd.yaml":
            args[args.index("32-true")] = "bf16-mixed"
    elif group == "imagenet":
        args += [
            "--data.root",
            str(imagenet),
            *small_loaders,
            "--data.crop_size",
            "32",
            "--data.resize_size",
            "36",
            "--trainer.strategy",
            "auto",
            "--model.arch_kwargs",
            "{}",
        ]
        if name == "resnet18_w1a4.yaml":
            args[args.index("32-true")] = "bf16-mixed"
    return args


def test_every_recipe_of_the_issue_exists() -> None:
    assert sorted(EXPECTED) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_logs_to_wandb(
    recipe: str,
    tmp_path: Path,
    mnist_root: Path,
    cifar_root: Path,
    imagenet_root: Path,
    float_checkpoints: dict,
) -> None:
    args = recipe_overrides(recipe, tmp_path, mnist_root, cifar_root, imagenet_root, float_checkpoints)
    cli = run_cli(["fit", "--config", str(REPO / "recipes" / recipe), *args])
    # The recipe's effective config: the base files it names, the recipe, then the overrides above.
    config = cli.config["fit"]
    assert config["trainer.logger.init_args.project"] == "lightning-ste"

    is_regression = "teacher_student" in recipe
    val_metrics = {"val/loss"} if is_regression else {"val/loss", "val/acc"}
    if recipe.startswith("imagenet/"):
        val_metrics.add("val/acc_top5")
    assert val_metrics <= set(cli.final_metrics)
    assert all(np.isfinite(v) for v in cli.final_metrics.values())
    assert cli.trainer.global_step == 2

    # The quantization sections of the recipe converted the model, in order, before training.
    kinds = [r["kind"] for r in recipes_on(cli.model)]
    assert sorted(kinds) == sorted(k for k in ("activations", "weights") if config.get(k) is not None)
    if config.get("activations") is not None:
        quant = [m for m in cli.model.modules() if isinstance(m, QuantReLU)]
        assert quant and all(q.bits == config["activations.init_args.bits"] for q in quant)

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    expected = {"train/loss", *val_metrics}
    if not is_regression:
        expected.add("lr-SGD")
    logged = wandb_history_keys(run_files[0])
    assert expected <= logged, f"missing in the W&B run: {expected - logged}"
