"""ImageNet training data pipeline throughput (images/s) of ``ImageNetDataModule``, per worker count.

Writes an ImageFolder tree of generated JPEGs of ImageNet's typical size (500x375, quality 90: about 110 KB
each, like the ILSVRC-2012 training set) and times whole batches coming out of the recipe's train
DataLoader (decode, RandomResizedCrop 224, flip, uint8 tensor; the float conversion and normalisation run
on the accelerator after the transfer), after a warm-up batch per worker.

    python benchmarks/bench_imagenet_pipeline.py --workers 1 2 --images 768
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ste.recipes.data import ImageNetDataModule


def write_tree(root: Path, images: int, classes: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # Smooth random fields compress like photographs (pure noise would be ~5x larger than a real JPEG).
    base = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = np.roll(base, shift=i, axis=1) ^ rng.integers(0, 32, size=base.shape, dtype=np.uint8)
            image = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.int16)
            image = image + rng.integers(-30, 31, size=image.shape)  # texture: real photos' JPEG size
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def throughput(root: Path, workers: int, batch_size: int) -> tuple[float, int]:
    data = ImageNetDataModule(
        root=str(root),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    batches = iter(loader)
    for _ in range(max(workers, 1)):  # every worker has started and decoded once
        next(batches)
    count, start = 0, time.perf_counter()
    for x, _ in batches:
        count += len(x)
    return count / (time.perf_counter() - start), count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, args.images)
        size = sum(p.stat().st_size for p in (root / "train").rglob("*.JPEG")) / args.images / 1e3
        print(
            f"ImageNet train pipeline, {args.images} JPEGs of 500x375 ({size:.0f} KB each), batch {args.batch_size}"
        )
        print(f"{'workers':>7} {'img/s (median)':>15} {'img/s per worker':>17} {'timed images':>13}")
        for workers in args.workers:
            runs = [throughput(root, workers, args.batch_size) for _ in range(args.rounds)]
            rate = statistics.median(r for r, _ in runs)
            print(f"{workers:>7} {rate:>15.0f} {rate / max(workers, 1):>17.0f} {runs[0][1]:>13}")


if __name__ == "__main__":
    main()
