"""What some tests need from the machine, as skip markers that say how to get it.

``bash scripts/setup.sh`` installs all of it, so in CI and after the README's set-up nothing
here skips; a checkout without the set-up gets a skip that names the missing package.
"""
import shutil

import pytest

from graphopt.data import DatasetMissingError, load_fashion_mnist


def _fashion_mnist_installed() -> bool:
    try:
        load_fashion_mnist("test")
    except DatasetMissingError:
        return False
    return True


needs_arm_toolchain = pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
    reason="ARM builds need g++-aarch64-linux-gnu and qemu-user: bash scripts/setup.sh installs them")

needs_fashion_mnist = pytest.mark.skipif(
    not _fashion_mnist_installed(),
    reason="Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist (bash scripts/setup.sh does)")
