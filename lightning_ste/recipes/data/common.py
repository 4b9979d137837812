"""What every data module shares: where the data lives, and tensor datasets served by index batches."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_ste.recipes.hyperparameters import hparams

__all__ = [
    "DATA_ENV",
    "BatchIndexedTensors",
    "ResumableDataLoader",
    "ResumableRandomSampler",
    "ResumableDataModule",
    "SkippingBatchSampler",
    "resolve_root",
    "resumable_loader",
    "subset_indices",
    "tensor_loader",
]

DATA_ENV = "LIGHTNING_STE_DATA"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` when given, else ``$LIGHTNING_STE_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_ENV) or "./data").expanduser()


def subset_indices(n: int, size: int | None, seed: int) -> Tensor | None:
    """A seeded random subset of ``size`` of ``range(n)``; None for the whole set."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"a subset size must be >= 1, got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


class BatchIndexedTensors(TensorDataset):
    """A TensorDataset the DataLoader reads a whole batch from with one index per tensor (``__getitems__``)
    instead of ``batch_size`` single items and a stack; samplers (shuffle, Lightning's DistributedSampler)
    are unchanged."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _as_is(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return batch


class SkippingBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next pass can leave out its first ``skip`` batches without loading them
    (only their indices are drawn, so the order of the rest is that of an uninterrupted pass)."""

    skip: int = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableRandomSampler(RandomSampler):
    """A ``RandomSampler`` that keeps its generator's state at the start of each pass, and can restore it.

    The generator is seeded from torch's global RNG on the first pass, the draw a plain ``RandomSampler``
    makes, so the first pass is the order of ``DataLoader(shuffle=True)``; later passes continue the
    generator (``seed_everything`` still sets every order).
    """

    epoch_start: Tensor | None = None

    def __iter__(self) -> Iterator[int]:
        if self.generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)
        self.epoch_start = self.generator.get_state()
        yield from super().__iter__()

    def restore(self, state: Tensor) -> None:
        """Make the next pass start from the generator state ``state`` (an ``epoch_start``)."""
        if self.generator is None:
            self.generator = torch.Generator()
        self.generator.set_state(state)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch (it has ``state_dict``/``load_state_dict``).

    State: the shuffle generator's state at the start of the current epoch and the number of batches handed
    out in it. Loading it makes the next pass draw the same order and skip, without loading them, the
    batches already trained on, so a run resumed from a mid-epoch checkpoint sees the batches an uninterrupted
    run sees. A finished epoch is saved as "the next epoch starts from the generator's current state".
    ``epoch_length`` (set by the data module) says how many batches the trainer takes per epoch
    (``limit_train_batches``); None means all. Under DDP Lightning's DistributedSampler (ordered by seed and
    epoch) replaces the sampler; the skip still applies.
    """

    _pending: dict[str, Any] | None = None
    _started: bool = False
    _served: int = 0
    epoch_length: Callable[[], float] | None = None

    def _shuffler(self) -> ResumableRandomSampler | None:
        sampler = getattr(self.batch_sampler, "sampler", None)
        return sampler if isinstance(sampler, ResumableRandomSampler) else None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        state, self._pending = self._pending, None
        skip = 0
        if state is not None:
            shuffler = self._shuffler()
            if shuffler is not None and state.get("generator") is not None:
                shuffler.restore(state["generator"])
            skip = int(state.get("served", 0))
        self._started, self._served = True, skip
        if skip and isinstance(self.batch_sampler, SkippingBatchSampler):
            self.batch_sampler.skip, skip = skip, 0
        return self._counted(super().__iter__(), skip)

    def _counted(self, batches: Iterator[Any], drop: int) -> Iterator[Any]:
        for i, batch in enumerate(batches):
            if i < drop:  # only without a SkippingBatchSampler: these batches are loaded, then dropped
                continue
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        length: float = len(self)
        if self.epoch_length is not None:
            length = min(length, self.epoch_length())
        shuffler = self._shuffler()
        if not self._started or self._served >= length:
            current = shuffler.generator if shuffler is not None else None
            return {"generator": None if current is None else current.get_state(), "served": 0}
        return {"generator": shuffler.epoch_start if shuffler is not None else None, "served": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        served = state_dict.get("served")
        if not isinstance(served, int) or served < 0:
            raise ValueError(f"a ResumableDataLoader state needs `served`, an int >= 0, got {served!r}")
        self._pending = dict(state_dict)


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool = False,
    **kwargs: Any,
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` over ``dataset`` (``kwargs`` go to ``DataLoader``); with ``shuffle`` the
    order of a :class:`ResumableRandomSampler`."""
    sized = cast(Sized, dataset)  # the recipe datasets are map-style: they have a length
    sampler = ResumableRandomSampler(sized) if shuffle else SequentialSampler(sized)
    batches = SkippingBatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return ResumableDataLoader(dataset, batch_sampler=batches, **kwargs)


class ResumableDataModule(pl.LightningDataModule):
    """Base of the recipe data modules: the four loaders over ``train_data`` / ``val_data`` (test and predict
    use the validation data), and the training loader's position in the checkpoint.

    ``state_dict`` holds the training loader's state, so a checkpoint taken at an epoch end (which Lightning
    does not hand to the loader) also resumes with the shuffle order an uninterrupted run would draw next.
    Subclasses fill ``train_data`` / ``val_data`` in ``setup``; in-memory ``(x, y)`` tensors by default, other
    data with their own :meth:`_loader`. ``VAL_BATCH_SIZE`` fixes the validation batch (else the
    ``val_batch_size`` hyperparameter).
    """

    VAL_BATCH_SIZE: int | None = None
    train_data: Any
    val_data: Any
    _train_loader: ResumableDataLoader | None = None
    _train_state: dict[str, Any] | None = None

    def _loader(self, data: Any, batch_size: int, shuffle: bool) -> ResumableDataLoader:
        x, y = data
        return tensor_loader(x, y, batch_size, shuffle)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_data, hparams(self).batch_size, shuffle=True)
        loader.epoch_length = self._epoch_length
        if self._train_state is not None:
            loader.load_state_dict(self._train_state)
            self._train_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, self.VAL_BATCH_SIZE or hparams(self).val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _epoch_length(self) -> float:
        trainer = self.trainer  # None until a Trainer uses the data module
        return getattr(trainer, "num_training_batches", math.inf) if trainer is not None else math.inf

    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_state = state_dict.get("train_loader")


def tensor_loader(
    x: Tensor, y: Tensor, batch_size: int, shuffle: bool, drop_last: bool = False
) -> ResumableDataLoader:
    """A resumable DataLoader over in-memory tensors (no workers: indexing a tensor is cheaper than a worker
    hop)."""
    return resumable_loader(
        BatchIndexedTensors(x, y), batch_size, shuffle, drop_last=drop_last, collate_fn=_as_is
    )
