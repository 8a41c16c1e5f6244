"""The benchmark command runs end to end in a tiny configuration (no speed is asserted)."""

import shutil

import pytest

from tests.helpers import run_module
from vae_lightning import bench
from vae_lightning.bench import LOOPS

pytestmark = pytest.mark.cli


def test_bench_times_every_loop_against_the_bare_loop_and_minimal_lightning(cifar_dir, tmp_path):
    args = [f"--data-dir={cifar_dir}", "--archs=mlp", "--batch-size=16", "--warmup=1"]
    args += ["--steps=2", "--rounds=1", "--paths=device,dataloader", "--target-bpd=20"]
    proc = run_module("vae_lightning.bench", [*args, "--val-every=2", "--max-epochs=1"], tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: ") and "torch " in lines[1] and "batch 16" in lines[2]
    for path in ("device", "dataloader"):
        rows = {
            name: line.split()[-5:]
            for name, label in LOOPS.items()
            for line in lines
            if line.startswith(f"mlp     {label}") and line.split()[-6] == path
        }
        assert rows.keys() == LOOPS.keys(), lines
        bare_ms, lightning_ms = float(rows["bare"][0]), float(rows["lightning"][0])
        for ms, images_per_s, outside, x_bare, x_lightning in rows.values():
            assert float(ms) > 0 and float(images_per_s) > 0 and 0 <= float(outside[:-1]) <= 100
            assert float(x_bare[:-1]) == pytest.approx(bare_ms / float(ms), rel=0.05)
            assert float(x_lightning[:-1]) == pytest.approx(lightning_ms / float(ms), rel=0.05)
        assert rows["bare"][3] == "1.00x" and rows["lightning"][4] == "1.00x"
    assert any("val/bpd <= 20.0: reached" in line for line in lines)


def test_the_small_model_mode(cifar_dir, tmp_path):
    args = [f"--data-dir={cifar_dir}", "--small", "--warmup=1", "--steps=2", "--rounds=1"]
    proc = run_module("vae_lightning.bench", [*args, "--loops=bare,command"], tmp_path)
    lines = proc.stdout.splitlines()
    assert "small model (H = 8, hidden 32), batch 16" in lines[2]
    assert [line.split()[1] for line in lines[4:]] == ["bare", "+"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("--loops=bare,fastest", "--loops: ['fastest'] unknown"),
        ("--precision=bf16-true", "--precision=bf16-true: the bare loop runs 32-true"),
        ("--set=model.optimizer.fused=true", "--set model.optimizer.fused=true: Could not"),
    ],
)
def test_refused_settings_get_one_line(cifar_dir, bad, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main([f"--data-dir={cifar_dir}", "--archs=mlp", bad])
    code = exit_.value.code  # argparse's status after its message, or the one-line message
    said = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None) and message in said and "Traceback" not in said


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
