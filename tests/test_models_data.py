"""Recipe networks and data modules: shapes, the papers' structure, data layouts, roots, init_from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ste.recipes.data import (
    CIFAR10DataModule,
    ImageNetDataModule,
    MNISTDataModule,
    OrthogonalSubspacesDataModule,
    TeacherStudentDataModule,
    resolve_root,
)
from lightning_ste.recipes.data.cifar10 import read_cifar10, write_cifar10
from lightning_ste.recipes.models import ARCHITECTURES, Classifier, LeNet5, TeacherStudent, build_network


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("twolayer", (3, 784)),
        ("lenet5", (3, 1, 28, 28)),
        ("vgg11", (3, 3, 32, 32)),
        ("resnet20", (3, 3, 32, 32)),
        ("resnet18", (3, 3, 64, 64)),
    ],
)
def test_networks_output_class_scores(arch: str, shape: tuple[int, ...]) -> None:
    net = build_network(arch, num_classes=7).eval()
    assert net(torch.randn(shape)).shape == (3, 7)
    # One ReLU module per call site, so each quantizer gets its own alpha (torchvision's ResNet-18 aside):
    # every ReLU module runs exactly once per forward (modules() lists a shared one once, so count calls).
    if arch != "resnet18":
        calls: dict[int, int] = {}
        relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
        for m in relus:
            m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        with torch.no_grad():
            net(torch.randn(shape))
        assert relus and calls == {id(m): 1 for m in relus}


def test_imagenet_resnet18_loads_torchvision_weights_strictly(tmp_path: Path, monkeypatch) -> None:
    """Cached torchvision weights load exactly (a new head aside); a foreign or missing key fails."""
    import torchvision

    from lightning_ste.recipes.models.resnet_imagenet import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    member = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    path = tmp_path / "hub" / "checkpoints" / Path(member.url).name
    path.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    net = resnet18(num_classes=10, weights="IMAGENET1K_V1")
    assert torch.equal(net.conv1.weight, state["conv1.weight"]) and net.fc.out_features == 10
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra\.weight'\]"):
        resnet18(num_classes=10, weights="IMAGENET1K_V1")
    torch.save({k: v for k, v in state.items() if k != "layer1.0.bn1.bias"}, path)
    with pytest.raises(ValueError, match=r"missing keys \['layer1\.0\.bn1\.bias'\]"):
        resnet18(num_classes=10, weights="IMAGENET1K_V1")


def test_lenet5_has_affine_free_batchnorm_before_each_relu() -> None:
    net = LeNet5()
    children = list(net.named_children())
    for i, (name, module) in enumerate(children):
        if isinstance(module, nn.ReLU):
            prev = children[i - 1][1]
            assert isinstance(prev, nn.modules.batchnorm._BatchNorm) and not prev.affine, name
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 4


def test_unknown_arch_and_optimizer_are_refused() -> None:
    with pytest.raises(ValueError, match="`arch`.*lenet5"):
        Classifier(arch="alexnet")
    with pytest.raises(ValueError, match="`optimizer`"):
        Classifier(optimizer="lbfgs")
    assert set(ARCHITECTURES) == {"twolayer", "lenet5", "vgg11", "resnet20", "resnet18"}


def test_init_from_loads_float_weights_strictly(tmp_path: Path) -> None:
    src = Classifier(arch="lenet5")
    path = tmp_path / "float.ckpt"
    torch.save({"state_dict": src.state_dict(), "hyper_parameters": dict(src.hparams)}, path)
    dst = Classifier(arch="lenet5", init_from=str(path))
    assert torch.equal(dst.net.conv1.weight, src.net.conv1.weight)
    assert "init_from" not in dst.hparams  # a model rebuilt from its checkpoint does not need the file
    torch.save(src.net.state_dict(), tmp_path / "bare.pt")  # a bare network state_dict works too
    assert torch.equal(
        Classifier(arch="lenet5", init_from=str(tmp_path / "bare.pt")).net.fc3.bias, src.net.fc3.bias
    )
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        Classifier(arch="twolayer", init_from=str(path))
    torch.save(
        {"state_dict": src.state_dict(), "lightning_ste": {"recipes": [{"kind": "activations"}]}}, path
    )
    with pytest.raises(ValueError, match="already quantized"):
        Classifier(arch="lenet5", init_from=str(path))


def test_orthogonal_subspaces_put_each_class_in_its_own_block() -> None:
    dm = OrthogonalSubspacesDataModule(num_classes=4, dim=3, n_train=200, n_val=50)
    dm.setup("fit")
    x, y = dm.train_data
    assert x.shape == (200, 12) and dm.in_features == 12
    blocks = x.view(200, 4, 3)
    nonzero = blocks.abs().sum(-1) > 0
    assert torch.equal(nonzero.float().argmax(1), y) and torch.all(nonzero.sum(1) == 1)
    # Zero mean per class: the class means carry no linear signal.
    for k in range(4):
        assert blocks[y == k, k].mean(0).abs().max() < 0.5
    dm2 = OrthogonalSubspacesDataModule(num_classes=4, dim=3, n_train=20, val_on_train=True)
    dm2.setup("fit")
    assert dm2.val_data is dm2.train_data


def test_teacher_student_labels_follow_the_teacher() -> None:
    dm = TeacherStudentDataModule(m=6, n=4, n_train=32, n_val=16)
    dm.setup("fit")
    z, y = dm.train_data
    assert z.shape == (32, 6, 4) and torch.allclose(dm.w_star.norm(), torch.tensor(1.0))
    assert torch.allclose(y, (z @ dm.w_star > 0).float() @ dm.v_star)
    model = TeacherStudent(m=6, n=4)
    assert model(z).shape == (32,)


def test_mnist_subsets_in_memory_and_root_from_env(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_STE_DATA", str(mnist_root))
    assert resolve_root(None) == mnist_root and resolve_root("x") == Path("x")
    dm = MNISTDataModule(subset=300, val_subset=100, flatten=True, download=False)
    assert dm.root == mnist_root
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 784) and x.dtype == torch.float32 and y.max() < 10
    assert len(dm.train_data[1]) == 300 and len(dm.val_data[1]) == 100
    assert abs(float(dm.train_data[0].mean())) < 0.2  # normalized
    monkeypatch.delenv("LIGHTNING_STE_DATA")
    assert resolve_root(None) == Path("./data")


def test_cifar10_reads_the_python_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (25, 3, 32, 32), dtype=np.uint8), list(range(10)) * 2 + [1] * 5)
    test = (rng.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8), [3] * 7)
    write_cifar10(tmp_path, train, test)
    x, y = read_cifar10(tmp_path, train=True)
    assert torch.equal(x, torch.from_numpy(train[0])) and y.tolist() == train[1]
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=5, num_workers=0, download=False)
    dm.prepare_data()
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (5, 3, 32, 32) and xb.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10DataModule(root=str(tmp_path / "missing"), download=False).prepare_data()


def test_imagenet_wrong_root_names_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks val/.*<root>/train/<class>/<image>.JPEG"):
        ImageNetDataModule(root=str(tmp_path)).prepare_data()


def test_tensor_loader_serves_the_batches_a_plain_loader_would() -> None:
    """One index per batch gives the same batches, in the same shuffled order, as batch_size single items."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ste.recipes.data.common import tensor_loader

    x, y = torch.randn(203, 1, 4, 4), torch.arange(203)
    for shuffle, drop_last in ((True, False), (False, True)):
        torch.manual_seed(5)
        got = list(tensor_loader(x, y, 16, shuffle=shuffle, drop_last=drop_last))
        torch.manual_seed(5)
        plain = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle, drop_last=drop_last)
        expected = list(plain)
        assert len(got) == len(expected)
        for (gx, gy), (ex, ey) in zip(got, expected):
            assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_imagenet_batches_are_uint8_in_workers_and_normalised_after_transfer(tmp_path: Path) -> None:
    """Workers hand over uint8 crops; on_after_batch_transfer gives what ToTensor + Normalize would."""
    from PIL import Image
    from torchvision import transforms

    from lightning_ste.recipes.data.imagenet import MEAN, STD

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = tmp_path / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "a.JPEG")
    data = ImageNetDataModule(
        root=str(tmp_path), batch_size=2, val_batch_size=2, num_workers=0, crop_size=32, resize_size=36
    )
    data.setup("fit")
    x, y = next(iter(data.val_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32)
    got, got_y = data.on_after_batch_transfer((x, y), 0)
    reference = transforms.Compose(
        [
            transforms.Resize(36),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    expected = torch.stack([reference(Image.open(path).convert("RGB")) for path, _ in data.val_data.samples])
    assert got.dtype == torch.float32 and torch.equal(got_y, y)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_classifier_logs_loss_at_the_logger_cadence_and_accuracy_per_epoch(
    mnist_root: Path, tmp_path: Path
) -> None:
    """A real Trainer with a CSVLogger on an MNIST subset: train/loss on every log_every_n_steps-th step,
    train/acc once per epoch (the accuracy over the whole epoch), val/acc per epoch."""
    import csv

    import lightning.pytorch as pl
    from fixtures import quiet_trainer
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0)
    data = MNISTDataModule(root=str(mnist_root), batch_size=32, subset=320, val_subset=200, download=False)
    model = Classifier(arch="lenet5", lr=0.05)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=4, logger=logger)
    trainer.fit(model, datamodule=data)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    acc_rows = [r for r in rows if r.get("train/acc")]
    assert loss_steps == [3, 7, 11, 15, 19]  # 10 batches per epoch, 20 steps, every 4th (0-based 3, 7, ...)
    assert len(acc_rows) == 2 and all(0.0 <= float(r["train/acc"]) <= 1.0 for r in acc_rows)
    assert sum(1 for r in rows if r.get("val/acc")) == 2
