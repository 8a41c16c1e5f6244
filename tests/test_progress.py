"""Training progress for output that goes to a file: plain lines with a true images/s."""

import logging
import re
import time

import lightning as L
import pytest

from tests.helpers import ADAM, MLP, fit_in_process
from vae_lightning.training.lit_module import VAELitModule
from vae_lightning.training.progress_bars import ProgressLog

LINE = re.compile(r"epoch 1/1(?P<end> \(end\))? step (?P<step>\d+) \| (?P<speed>\d+) img/s")


class SaveAtStep(L.Callback):
    """Saves a mid-epoch checkpoint after training step ``step``, as a SIGTERM would."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


# what any resume into its own folder from a mid-epoch checkpoint meets
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_run_resumed_mid_epoch_reports_its_true_speed(cifar_dir, tmp_path, caplog):
    """Lightning calls no on_train_epoch_start for an epoch resumed part-way, so the speed
    windows open at on_train_start; a line's images/s is at least its images over the wall time."""
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    mid_epoch = tmp_path / "step3.ckpt"
    fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        16,
        [SaveAtStep(3, mid_epoch)],
        max_steps=3,
        limit_val_batches=0,
    )
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="vae_lightning.training.progress_bars"):
        fit_in_process(
            module,
            cifar_dir,
            tmp_path,
            16,
            [ProgressLog(every_n_steps=1)],
            ckpt_path=mid_epoch,
            max_epochs=1,
            limit_val_batches=0,
        )
    wall = time.perf_counter() - started
    lines = [m for r in caplog.records if (m := LINE.search(r.getMessage()))]
    assert [(m["step"], bool(m["end"])) for m in lines] == [("4", False), ("5", False), ("5", True)]
    # 72 fixture images in batches of 16: steps 4 and 5 train 16 and 8, the epoch's rest 24
    for m, images in zip(lines, (16, 8, 24), strict=True):
        assert int(m["speed"]) >= int(images / wall), m.string
