"""Updates that would harm a run are skipped, on every rank alike and decided on the device: one
whose loss was NaN or infinite on any rank (then training stops, or goes on), and one whose
global gradient norm exceeds a threshold (VDVAE's recipe), with a warning when most are."""

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from vae_lightning.errors import ConfigError, UserError
from vae_lightning.training.step_rows import DeviceRows, is_reading_step

log = logging.getLogger(__name__)

NONFINITE_CHOICES = ("stop", "skip")
STUCK_WINDOW = 100
STUCK_SHARE = 0.5
"""Warn once when more than this share of the last STUCK_WINDOW updates were skipped."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


class UpdateGuards(L.Callback):
    """Skips an update whose loss was not finite on some rank (``pl_module.update_finite``,
    from the all-reduced batch sums) or whose gradient norm exceeds ``skip_grad_norm`` (null:
    never), then stops with ``NonFiniteLossError`` (``nonfinite_loss="stop"``) or goes on
    (``"skip"``). The weights and the optimizer's state stay as they were. What happened reaches
    the host only at logging steps, epoch ends and checkpoints (``_read``), so no step waits for
    the device; a stopped run writes no checkpoint after the bad step."""

    def __init__(self, nonfinite_loss: str = "stop", skip_grad_norm: float | None = None) -> None:
        if nonfinite_loss not in NONFINITE_CHOICES:
            raise ConfigError(
                f"nonfinite_loss={nonfinite_loss!r} is not allowed: nonfinite_loss must be stop "
                "or skip."
            )
        number = isinstance(skip_grad_norm, int | float) and not isinstance(skip_grad_norm, bool)
        if skip_grad_norm is not None and not (number and skip_grad_norm > 0):
            raise ConfigError(
                f"skip_grad_norm={skip_grad_norm!r} is not allowed: skip_grad_norm must be null "
                "or a number > 0."
            )
        self.nonfinite_loss = nonfinite_loss
        self.skip_grad_norm = skip_grad_norm
        self.nonfinite_skipped = 0
        self.skipped_updates = 0
        self._updates = DeviceRows(3)  # per update: nonfinite, gradient norm, this rank's loss
        self._local_loss: Tensor | None = None
        self._stepped = False
        self._on_device = False
        self._grad_norms: list[float] = []
        self._recent_skips: deque[bool] = deque(maxlen=STUCK_WINDOW)
        self._warned_stuck = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Skip on the device where every optimizer takes a ``found_inf`` flag (the fused Adam,
        AdamW and SGD kernels, as ``GradScaler`` uses them) that no ``GradScaler`` of
        Lightning's sets; otherwise by dropping the gradients, which waits for the device."""
        precision = trainer.precision_plugin
        scaled = isinstance(precision, MixedPrecision) and precision.scaler is not None
        takes_flag = [getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers]
        self._on_device = all(takes_flag) and not scaled

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        """This rank's losses of the update, for the message of a stopped run."""
        loss = loss.detach()
        self._local_loss = loss if self._local_loss is None else self._local_loss + loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        nonfinite = ~pl_module.update_finite
        skip = nonfinite
        norm = torch.zeros((), device=nonfinite.device)
        if self.skip_grad_norm is not None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).float()
            skip = nonfinite | ~(norm <= self.skip_grad_norm)  # a NaN norm is skipped too
        row = torch.stack([nonfinite.float(), norm, self._local_loss.float()])
        self._updates.append(row, (trainer.global_step, trainer.current_epoch))
        self._local_loss = None
        self._stepped = True
        if self._on_device:
            optimizer.found_inf = skip.float()
        elif skip:
            for param in pl_module.parameters():
                param.grad = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self._stepped:  # a batch that only accumulates gradients
            return
        self._stepped = False
        logging_step, last = is_reading_step(trainer, idx)
        if logging_step or last:
            self._read(trainer, pl_module)
            self._log(pl_module, new_window=logging_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._read(trainer, pl_module)  # in stop mode, a non-finite loss stops before the file
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        checkpoint["skipped_updates"] = self.skipped_updates

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        self.skipped_updates = int(checkpoint.get("skipped_updates", 0))

    def _read(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Bring the records of the updates since the last read to the host (one copy) and act
        on them."""
        for (step, epoch), (nonfinite, norm, local_loss) in self._updates.take():
            if nonfinite:
                self._nonfinite_update(trainer, step, epoch, local_loss)
            elif self.skip_grad_norm is not None:
                self._grad_norms.append(norm)
                self._count_skipped(not norm <= self.skip_grad_norm, trainer)

    def _nonfinite_update(
        self, trainer: L.Trainer, step: int, epoch: int, local_loss: float
    ) -> None:
        if self.nonfinite_loss == "skip":
            self.nonfinite_skipped += 1
            if trainer.global_rank == 0:
                log.warning(
                    f"Non-finite loss at step {step}: step skipped on every rank "
                    f"({self.nonfinite_skipped} so far)."
                )
            return
        last = _last_checkpoint(trainer)
        what_now = (
            f"the last good checkpoint is {last}: resume from it (ckpt_path=...) with"
            if last
            else "no checkpoint was written yet: restart with"
        )
        value = "not finite on another DDP rank" if math.isfinite(local_loss) else local_loss
        raise NonFiniteLossError(
            f"The loss is {value} at step {step} (epoch {epoch}); {what_now} a lower "
            "model.optimizer.lr, or set callbacks.update_guards.nonfinite_loss=skip."
        )

    def _count_skipped(self, skipped: bool, trainer: L.Trainer) -> None:
        self.skipped_updates += skipped
        self._recent_skips.append(skipped)
        share = sum(self._recent_skips) / len(self._recent_skips)
        full = len(self._recent_skips) == STUCK_WINDOW
        if full and share > STUCK_SHARE and not self._warned_stuck and trainer.global_rank == 0:
            self._warned_stuck = True
            log.warning(
                f"Training is stuck: {share:.0%} of the last {STUCK_WINDOW} updates were "
                "skipped, their gradient norm above callbacks.update_guards.skip_grad_norm="
                f"{self.skip_grad_norm} (see train/grad_norm). Raise it, lower "
                "model.optimizer.lr, or clip with trainer.gradient_clip_val."
            )

    def _log(self, pl_module: L.LightningModule, new_window: bool) -> None:
        """Log the counters, and the mean gradient norm since the last logging step, as values
        on the host."""
        values: dict[str, float] = {}
        if self.nonfinite_loss == "skip":
            values["train/nonfinite_skipped"] = self.nonfinite_skipped
        if self.skip_grad_norm is not None:
            if self._grad_norms:
                values["train/grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
            values["train/skipped_updates"] = self.skipped_updates
        if new_window:
            self._grad_norms = []
        if values:
            cpu = {name: torch.tensor(float(v), dtype=torch.float64) for name, v in values.items()}
            pl_module.log_dict(cpu, on_step=True, on_epoch=False)


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    paths = [
        Path(p)
        for cb in trainer.checkpoint_callbacks
        for p in (cb.best_model_path, cb.last_model_path)
        if p and Path(p).is_file()
    ]
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None
