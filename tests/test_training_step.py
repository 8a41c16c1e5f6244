"""A training step never waits for the device, and what the loggers get is the mean of the steps
since the last logging step."""

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import (
    callback_overrides,
    composed,
    metrics_csv,
    offline_wandb_run,
    run_train,
    single_run,
    write_cifar10,
)
from vae_lightning.train import train
from vae_lightning.training.step_rows import DeviceRows

HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select"}
"""Operators whose result the host must wait for on a GPU: ``.item()``, ``bool()``, ``float()``
and comparisons of whole tensors, data-dependent shapes."""


class HostReadCounter(TorchDispatchMode):
    """Counts ``HOST_READS`` per training step: from one step's ``on_train_batch_start`` to the
    next one's, so a step's share includes Lightning's bookkeeping after it."""

    active: "HostReadCounter | None" = None

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.reads: Counter[int] = Counter()
        self.names: dict[int, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self.step is not None and name in HOST_READS:
            self.reads[self.step] += 1
            self.names.setdefault(self.step, set()).add(name)
        return func(*args, **(kwargs or {}))


class MarkSteps(L.Callback):
    """Test callback, added from the config: tells ``HostReadCounter.active`` which step runs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        HostReadCounter.active.step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        HostReadCounter.active.step = None


def job_config(*overrides: str) -> DictConfig:
    """The config ``python -m vae_lightning.train OVERRIDES`` runs with, in this process: Hydra's
    own part set as the command sets it."""
    cfg = composed(*overrides, hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.job.override_dirname = "test"
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize(
    "settings",
    [
        [],
        [
            "model.sigma_mode=optimal",
            "callbacks.update_guards.nonfinite_loss=skip",
            "callbacks.update_guards.skip_grad_norm=1e9",
            "model.kl_schedule.kind=linear",
        ],
    ],
    ids=["defaults", "every guard"],
)
def test_the_train_command_reads_nothing_from_the_device_between_logging_steps(tmp_path, settings):
    """The train command's own configuration (CSV logger, every default callback, the guards)
    for 20 steps, logging every 5: the host reads a value from the device at the logging steps
    alone. (The progress line, every 10 steps here and 100 by default, reads only the values
    logged at the logging steps, which live on the host.)"""
    data = write_cifar10(tmp_path / "data", images_per_file=64)  # 36 steps per epoch
    cfg = job_config(
        f"data.data_dir={data}",
        "data.batch_size=8",
        "model/arch=mlp",
        "model.arch.encoder.hidden_dims=[32]",
        "model.arch.decoder.hidden_dims=[32]",
        "logger=csv",
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=5",
        "trainer.limit_val_batches=0",
        "~callbacks.model_checkpoint",  # it monitors val/bpd, and nothing validates here
        "callbacks.progress_bar.every_n_steps=10",
        "test=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        *callback_overrides("mark_steps", MarkSteps),
        *settings,
    )
    HostReadCounter.active = counter = HostReadCounter()
    with counter:
        train(cfg)
    logging_steps = {4, 9, 14, 19}
    assert {step: counter.names[step] for step in counter.reads if step not in logging_steps} == {}
    assert all(counter.reads[step] > 0 for step in logging_steps)  # the counter sees reads
    rows = [r for r in metrics_csv(tmp_path / "run") if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == sorted(logging_steps)


class RecordLosses(L.Callback):
    """Test callback, added from the command line: writes each training step's loss (the mean
    over its batch that ``training_step`` returned) and batch size to ``losses.json``."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step - 1, float(outputs["loss"]), len(batch[0])))

    def on_train_end(self, trainer, pl_module) -> None:
        Path("losses.json").write_text(json.dumps(self.steps))


@pytest.mark.cli
def test_each_logged_training_value_is_the_mean_over_the_steps_since_the_last_one(
    cifar_dir, tmp_path
):
    """72 images in five batches an epoch (of 15 or 14 images), logged every 3 steps: each
    logged train/loss is the image-weighted mean of the step losses since the last logging
    step, across an epoch's end too, and CSV and W&B get the same values."""
    args = [f"data.data_dir={cifar_dir}", "data.batch_size=16", "data.num_workers=0"]
    args += ["trainer.max_epochs=2", "trainer.log_every_n_steps=3", "logger=[csv,wandb]"]
    run_train([*args, *callback_overrides("record", RecordLosses)], tmp_path)
    steps = json.loads((tmp_path / "losses.json").read_text())
    assert len(steps) == 10 and len({size for *_, size in steps}) == 2
    expected = {}
    for end in (2, 5, 8):
        window = steps[end - 2 : end + 1]
        expected[end] = sum(loss * size for _, loss, size in window) / sum(s for *_, s in window)

    run = single_run(tmp_path)
    csv_rows = {int(r["step"]): float(r["train/loss"]) for r in metrics_csv(run) if r["train/loss"]}
    assert csv_rows == pytest.approx(expected, rel=1e-6)
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    history = offline_wandb_run(wandb_run)["history"]
    logged = {h["trainer/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == csv_rows


def test_device_rows_hand_over_the_oldest_rows_and_keep_the_rest():
    rows = DeviceRows(2)
    for step in range(100):  # past the first buffer of 64 rows
        rows.append(torch.tensor([step, 2.0 * step]), tag=step)
    taken = rows.take(70)
    assert taken == [(step, [step, 2.0 * step]) for step in range(70)] and len(rows) == 30
    assert rows.take() == [(step, [step, 2.0 * step]) for step in range(70, 100)]
    assert rows.take() == [] and len(rows) == 0
