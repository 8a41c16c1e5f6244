"""The benchmark command runs end to end in a tiny configuration (no speed is asserted)."""

import shutil

import pytest

from tests.helpers import run_module

pytestmark = pytest.mark.cli


def test_bench_reports_both_data_paths_and_time_to_target(cifar_dir, tmp_path):
    proc = run_module(
        "vae_lightning.bench",
        [
            f"--data-dir={cifar_dir}",
            "--archs=mlp",
            "--batch-size=16",
            "--warmup=1",
            "--steps=2",
            "--target-bpd=20",
            "--val-every=2",
            "--max-epochs=1",
        ],
        cwd=tmp_path,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: ") and "torch " in lines[1] and "batch 16" in lines[2]
    device = next(line for line in lines if line.startswith("mlp      device "))
    loader = next(line for line in lines if "dataloader (2 workers)" in line)
    for row in (device, loader):
        images_per_s, epoch_s, share = row.split()[-3:]
        assert float(images_per_s) > 0 and float(epoch_s) > 0 and 0 <= float(share[:-1]) <= 100
    assert any("device / dataloader throughput:" in line for line in lines)
    assert any("val/bpd <= 20.0: reached" in line for line in lines)


def test_bench_reports_a_damaged_dataset_in_one_line(cifar_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    batch = data / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    proc = run_module(
        "vae_lightning.bench", [f"--data-dir={data}", "--archs=mlp"], tmp_path, expect_ok=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"Error: {batch} is not a CIFAR-10 batch" in proc.stderr
