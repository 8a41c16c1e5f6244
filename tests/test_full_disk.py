"""A disk that fills up: one line naming it, every file under its final name whole, and the run
or the FID pass resumes once space is freed. The disk is a small tmpfs (mounting one needs
root; the tests skip without it)."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import DDP, run_module, run_train
from vae_lightning.evaluation.fid import feature_statistics, image_slices
from vae_lightning.files import DiskFullError, write_text_atomically
from vae_lightning.training.checkpoints import read_checkpoint

SMALL_MODEL = [
    "model/arch=mlp",
    "model.arch.encoder.hidden_dims=[32]",
    "model.arch.decoder.hidden_dims=[32]",
    "model.latent_dim=2",
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 MB tmpfs of its own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write one file to ``disk`` until about ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(shutil.disk_usage(disk).free - leave))
    return filler


def assert_whole(folder: Path) -> None:
    """No temporary file is left, and every file under a final name reads."""
    assert not list(folder.rglob("*.tmp"))
    for path in folder.rglob("*"):
        if path.suffix == ".ckpt":
            read_checkpoint(path)
        elif path.suffix in (".yaml", ".json"):
            yaml.safe_load(path.read_text())


@pytest.mark.cli
def test_a_full_disk_stops_training_and_evaluation_in_one_line_and_the_run_resumes(
    cifar_dir, small_disk, tmp_path
):
    """Training meets the full disk (with 2 processes: rank 0 writes, the other must stop too),
    then an evaluation does; once space is freed, the run resumes from its last checkpoint."""
    run = small_disk / "run"
    args = [f"data.data_dir={cifar_dir}", *SMALL_MODEL, f"hydra.run.dir={run}"]
    run_train([*args, "trainer.max_epochs=1"], tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=True)["global_step"]

    filler = fill(small_disk, leave=last.stat().st_size // 2)
    proc = run_train([*args, *DDP, "trainer.max_epochs=2"], tmp_path, expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Error: No space left on the disk at {small_disk} for {run}/" in proc.stderr
    assert "MB, " in proc.stderr and "MB are free" in proc.stderr
    assert_whole(run)
    assert torch.load(last, weights_only=True)["global_step"] == steps_per_epoch

    filler.unlink()
    filler = fill(small_disk, leave=64 * 1024)  # room for the config, not for the image grids
    output = small_disk / "eval"
    evaluate = [f"ckpt_path={last}", "eval.limit=8", "eval.num_samples=2", "eval.fid.enabled=false"]
    proc = run_module(
        "vae_lightning.evaluate", [*evaluate, f"hydra.run.dir={output}"], tmp_path, expect_ok=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Error: No space left on the disk at {small_disk} for {output}/" in proc.stderr
    assert not (output / "eval.json").exists()
    assert_whole(output)

    filler.unlink()
    resumed = run_train([*args, "trainer.max_epochs=2"], tmp_path)
    assert f"Resuming from {last}" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 2 * steps_per_epoch
    assert_whole(run)


class Features(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], dim=1)


def test_a_fid_pass_stopped_by_a_full_disk_resumes_once_space_is_freed(small_disk):
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    slices = image_slices(images, torch.device("cpu"))
    partial = small_disk / "fid" / "pass.partial.pt"
    filler = None

    def filling_at_60(start: int, stop: int) -> torch.Tensor:
        nonlocal filler
        if start == 60 and filler is None:
            filler = fill(small_disk, leave=0)
        return slices(start, stop)

    with pytest.raises(DiskFullError, match=f"No space left on the disk at {small_disk}"):
        feature_statistics(Features(), filling_at_60, 100, "x", partial, batch_size=10, chunk=30)
    assert torch.load(partial, weights_only=True)["count"] == 60  # whole, as last saved
    assert not list(partial.parent.glob("*.tmp"))

    filler.unlink()
    resumed = feature_statistics(Features(), slices, 100, "x", partial, batch_size=10, chunk=30)
    whole = feature_statistics(Features(), slices, 100, "x", None, batch_size=10)
    assert resumed.count == whole.count == 100
    torch.testing.assert_close(resumed.total, whole.total)
    torch.testing.assert_close(resumed.outer, whole.outer)


def test_a_temporary_left_by_a_killed_writer_goes_with_the_next_write(tmp_path):
    killed = subprocess.Popen(["sleep", "0"])
    killed.wait()  # its pid names no process now
    stale = tmp_path / f".metrics.json.{killed.pid}.tmp"
    stale.write_text('{"half": ')
    writing = tmp_path / f".metrics.json.{os.getppid()}.tmp"  # a running writer's: kept
    writing.write_text("{")
    write_text_atomically(tmp_path / "metrics.json", "{}")
    assert not stale.exists() and writing.exists()
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert not list(tmp_path.glob(f".metrics.json.{os.getpid()}.tmp"))
