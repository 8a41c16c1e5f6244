"""Files from elsewhere: a crafted checkpoint runs no code in any command, whatever torch's
default; a damaged or foreign checkpoint, and a damaged run config, get one line before any
data is read."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import LeavesMarker, run_module
from vae_lightning import report, results
from vae_lightning.training.checkpoints import CheckpointError, load_model, read_checkpoint

pytestmark = pytest.mark.cli

TRAIN = ["model.latent_dim=2", "logger=none", "trainer.max_epochs=1", "data.batch_size=16"]
UNSAFE_TORCH = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
"""torch's own override that makes ``torch.load`` unpickle anything where the caller leaves
``weights_only`` unset, as torch < 2.6 does by default."""


def craft(checkpoint_file: Path, marker: Path) -> None:
    """Rewrite ``checkpoint_file`` with a payload that creates ``marker`` when unpickled."""
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    checkpoint["callbacks"]["payload"] = LeavesMarker(marker)
    torch.save(checkpoint, checkpoint_file)


def test_the_crafted_checkpoint_runs_its_payload_when_fully_unpickled(trained_run, tmp_path):
    crafted, marker = tmp_path / "crafted.ckpt", tmp_path / "marker"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", crafted)
    craft(crafted, marker)
    torch.load(crafted, weights_only=False)
    assert marker.exists()  # so the commands below would create it if they unpickled it


@pytest.mark.parametrize("command", ["train", "evaluate", "results"])
def test_a_crafted_checkpoint_runs_no_code_in_any_command(
    command, trained_run, cifar_dir, tmp_path
):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained_run, run)
    for checkpoint_file in (run / "checkpoints").glob("*.ckpt"):
        craft(checkpoint_file, marker)
    last = run / "checkpoints" / "last.ckpt"
    module, args = {
        "train": (
            "vae_lightning.train",
            [f"data.data_dir={cifar_dir}", *TRAIN, f"ckpt_path={last}"],
        ),
        "evaluate": ("vae_lightning.evaluate", [f"ckpt_path={last}", f"data.data_dir={cifar_dir}"]),
        "results": ("vae_lightning.results", [str(run)]),
    }[command]
    proc = run_module(module, args, tmp_path, expect_ok=False, extra_env=UNSAFE_TORCH)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "holds Python objects other than tensors and plain settings" in proc.stderr
    assert not marker.exists()


def another_model(checkpoint: dict) -> None:
    checkpoint["hyper_parameters"]["latent_dim"] = 3  # weights of H = 2


def another_project(checkpoint: dict) -> None:
    checkpoint["hyper_parameters"] = {"hidden": 128, "lr": 0.1}


def test_evaluate_refuses_a_damaged_checkpoint_before_reading_data(trained_run, tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    source = trained_run / "checkpoints" / "last.ckpt"
    damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    args = [f"ckpt_path={damaged}", f"data.data_dir={tmp_path / 'no_data_here'}"]
    proc = run_module("vae_lightning.evaluate", args, tmp_path, expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"Error: ckpt_path={damaged} is truncated (an incomplete copy or download?)" in (
        proc.stderr
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (another_model, "holds weights of another model than its settings describe"),
        (another_project, "is a checkpoint of another project"),
    ],
)
def test_a_checkpoint_of_another_model_or_project_is_named_so(
    damage, message, trained_run, tmp_path
):
    """What evaluate and results load with: a ``CheckpointError``, one line in every command."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    damage(checkpoint)
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    with pytest.raises(CheckpointError) as err:
        load_model(damaged)
    assert str(err.value).startswith(f"ckpt_path={damaged} {message}")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (os.urandom(4096), "is not a torch checkpoint file"),
        (b"epoch: 3\n", "is not a torch checkpoint file"),
    ],
)
def test_files_that_are_no_checkpoint_are_named_for_what_they_are(content, message, tmp_path):
    path = tmp_path / "file.ckpt"
    path.write_bytes(content)
    with pytest.raises(
        CheckpointError, match=f"^ckpt_path={re.escape(str(path))} {re.escape(message)}"
    ):
        read_checkpoint(path)


def test_a_torch_file_without_a_state_dict_is_no_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint"):
        read_checkpoint(path)


def test_a_checkpoint_naming_a_foreign_class_is_not_built(trained_run, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    encoder = checkpoint["hyper_parameters"]["arch"]["encoder"]
    encoder["log"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    path = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"names builtins\.open in its settings"):
        load_model(path)
    assert not marker.exists()


def test_a_module_named_in_the_trusted_variable_is_built(trained_run, tmp_path, monkeypatch):
    (tmp_path / "own_heads.py").write_text(
        "from vae_lightning.core.likelihoods import GaussianLikelihood\n\n\n"
        "class Mine(GaussianLikelihood):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["likelihood"]["_target_"] = "own_heads.Mine"
    path = tmp_path / "own.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="VAE_LIGHTNING_TRUSTED_MODULES=own_heads"):
        load_model(path)
    monkeypatch.setenv("VAE_LIGHTNING_TRUSTED_MODULES", "other, own_heads")
    assert type(load_model(path).vae.likelihood).__name__ == "Mine"


def test_a_sound_checkpoint_loads_its_weights(trained_run):
    path = trained_run / "checkpoints" / "last.ckpt"
    model = load_model(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    "command, content, message",
    [
        ("evaluate", "model: {}\n", "it lacks data, seed"),
        ("results", "- model\n", "it holds list, not a mapping"),
        ("report", "model: [unclosed\n", "it is not YAML (while parsing"),
    ],
)
def test_a_damaged_run_config_is_named_in_one_line_before_any_work(
    command, content, message, trained_run, tmp_path
):
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text(content)
    args = {
        "evaluate": [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        "results": [str(run)],
        "report": [str(sweep), "--no-wandb"],
    }[command]
    expected = f"Error: {run / 'config.yaml'} is damaged: {message}"
    if command == "evaluate":  # a Hydra app: through its command line
        proc = run_module(f"vae_lightning.{command}", args, tmp_path, expect_ok=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert expected in proc.stderr
        return
    main = {"results": results.main, "report": report.main}[command]
    with pytest.raises(SystemExit) as stop:  # the one line the process exits with
        main(args)
    assert str(stop.value.code).startswith(expected)
