"""What the tests share: a tiny CIFAR-10 in the official pickle layout, running the commands as
a user does, reading what a run leaves on disk, and small model configs."""

import csv
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from vae_lightning.cli import CONFIG_DIR
from vae_lightning.data.cifar10 import BASE_FOLDER, TEST_FILES, TRAIN_FILES

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


SHORT = [
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "data.batch_size=16",
]
SPLITS_AND_METRICS = [
    f"{split}/{name}"
    for split in ("train", "val", "test")
    for name in ("loss", "recon_mse", "kl", "elbo", "bpd")
]


def single_run(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def sweep_jobs(cwd: Path) -> list[Path]:
    sweeps = list((cwd / "outputs" / "multiruns").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))


def metrics_csv(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def resolved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def assert_run_folder(run: Path) -> None:
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch*-bpd*.ckpt"))) == 1
    for name in ("reconstructions", "samples"):
        assert list((run / "images").glob(f"{name}_epoch=*.png")), name


DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
"""Two CPU processes (gloo)."""

MLP = {
    "encoder": {"_target_": "vae_lightning.core.architectures.MLPEncoder", "hidden_dims": [64]},
    "decoder": {"_target_": "vae_lightning.core.architectures.MLPDecoder", "hidden_dims": [64]},
}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def composed(*overrides: str, hydra: bool = False):
    """The train config as Hydra composes it for these overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)
