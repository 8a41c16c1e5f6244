"""Shared fixtures: a tiny CIFAR-10 in the official pickle layout, and a CLI runner."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vae_lightning.data import BASE_FOLDER, TEST_FILES, TRAIN_FILES

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_cifar10(root: Path, images_per_file: int = 16, seed: int = 0) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta with random images; return root."""
    rng = np.random.default_rng(seed)
    folder = root / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES + TEST_FILES:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, images_per_file).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, f)
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """80 training and 16 test images."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a new user without a W&B account, and no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.pop("NETRC", None)
    return env


def run_train(args: list[str], cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_module("vae_lightning.train", args, cwd, expect_ok)


def run_module(
    module: str, args: list[str], cwd: Path, expect_ok: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` in ``cwd``; fail with its output if it fails."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(cwd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def start_train(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``python -m vae_lightning.train ARGS`` in ``cwd`` without waiting; its stdout and
    stderr come together as text on ``stdout``."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=cwd,
        env=cli_env(cwd) | (extra_env or {}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_files(
    proc: subprocess.Popen, folder: Path, pattern: str, count: int = 1, timeout: float = 120
) -> list[Path]:
    """Wait until ``count`` files match ``pattern`` under ``folder`` while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while len(found := list(folder.glob(pattern))) < count:
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended or stalled"
        time.sleep(0.2)
    return found
