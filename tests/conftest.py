"""Fixtures shared by the tests; the helpers they use live in ``tests/helpers.py``."""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import write_cifar10

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """80 training and 16 test images."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))
