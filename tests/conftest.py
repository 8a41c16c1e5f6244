"""Fixtures shared by the tests; the helpers they use live in ``tests/helpers.py``."""

from pathlib import Path

import pytest

from tests.helpers import write_cifar10


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """80 training and 16 test images."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))
