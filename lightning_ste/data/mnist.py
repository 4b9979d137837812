from lightning_ste.recipes.data.mnist import MNISTDataModule  # moved; shim removed at integration

__all__ = ["MNISTDataModule"]
