"""Fixtures shared by the tests; the helpers they use live in ``tests/helpers.py``."""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import run_train, single_run, write_cifar10

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """80 training and 16 test images."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def trained_run(cifar_dir, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch run with H = 2 (so the grid integral applies), logged
    to CSV. Tests read it, or copy it to change it."""
    cwd = tmp_path_factory.mktemp("trained")
    settings = ["model.latent_dim=2", "logger=csv", "trainer.max_epochs=1", "data.batch_size=16"]
    run_train([f"data.data_dir={cifar_dir}", *settings, "data.num_workers=0"], cwd=cwd)
    return single_run(cwd)
