"""Moved to :mod:`lightning_ste.kernels.cpu`."""

from lightning_ste.kernels.cpu import *  # noqa: F403  # moved; shim removed at integration
