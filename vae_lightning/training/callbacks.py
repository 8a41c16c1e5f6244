"""Training callbacks: image grids (PNG and loggers) and a checkpoint when a run is preempted."""

import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchvision.utils import make_grid

from vae_lightning.files import save_png_atomically

GRID_COLUMNS = 8
GRID_CAPTIONS = {
    "reconstructions": "pairs of an image and its reconstruction (z = mu), 4 pairs a row",
    "samples": "decoder means for z drawn from the prior N(0, I)",
    "interpolations": "10 steps in latent space from one test image to another, a pair a row",
    "traversals": "one latent dim of the first image from -3 to 3, the most active dims a row",
}
"""What each grid shows, as its W&B caption; training and evaluation lay them out alike."""


def side_by_side(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Each original followed by its reconstruction, for a grid of ``GRID_COLUMNS``."""
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)


class ImageGrids(L.Callback):
    """Every ``every_n_epochs`` epochs and after the last one, saves two PNG grids:

    ``reconstructions_epoch=NNN.png`` (the first validation images in the top half, their
    reconstructions at the same places in the bottom half) and ``samples_epoch=NNN.png``
    (decoder means for fixed prior draws).
    """

    def __init__(
        self, output_dir: str, every_n_epochs: int = 5, num_images: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("num_images", num_images)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: it must be an integer >= 1")
        self.output_dir = Path(output_dir)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self._originals: Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if batch_idx == 0 and self._originals is None:
            self._originals = batch[0][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        is_last = (trainer.max_epochs or -1) > 0 and epoch + 1 >= trainer.max_epochs
        is_last |= 0 < trainer.max_steps <= trainer.global_step
        if trainer.sanity_checking or self._originals is None:
            return
        if (epoch + 1) % self.every_n_epochs == 0 or is_last or trainer.should_stop:
            self._write(trainer, pl_module, epoch)

    @rank_zero_only
    @torch.no_grad()
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        originals = self._originals.to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        grids = {
            "reconstructions": side_by_side(originals, pl_module(originals)),
            "samples": pl_module.vae.sample(self.num_images, generator=generator),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name, images in grids.items():
            grid = make_grid(images.clamp(0, 1).float().cpu(), nrow=GRID_COLUMNS)
            path = self.output_dir / f"{name}_epoch={epoch:03d}.png"
            save_png_atomically(grid, path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        f"images/{name}",
                        [str(path)],
                        step=trainer.global_step,
                        caption=[f"epoch {epoch + 1}: {GRID_CAPTIONS[name]}"],
                    )
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)


class CheckpointOnPreemption(L.Callback):
    """When a run is stopped from outside, saves the checkpoint ``path`` at the current step so
    that the run resumes from there: on SIGTERM (a cluster's preemption notice, ``kill``), and on
    the ``SystemExit`` that submitit raises when SLURM warns of a time-out (it requeues the job,
    which then resumes from ``path``). The checkpoint also carries the W&B run id, so the
    resumed run logs to the same W&B run.

    Under DDP every rank stops after the same step: SIGTERM only takes note on the rank that
    gets it, and after each step the ranks agree (one all-reduce) whether any of them got it.
    Lightning's own SIGTERM handler, which this one replaces during training, runs collectives
    inside the handler and forwards the signal, so ranks could stop at different steps and the
    run would crash instead of saving.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._sigterm = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:  # Lightning stops every rank after this step with a SIGTERMException
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if isinstance(exception, SIGTERMException | SystemExit):
            # Trainer.save_checkpoint without its closing barrier: under SLURM only rank 0 sees
            # submitit's SystemExit, and a barrier would wait forever for the other ranks.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, self.path)
            reason = "SIGTERM" if isinstance(exception, SIGTERMException) else "Preempted"
            rank_zero_info(f"{reason}: saved {self.path} at step {trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version
