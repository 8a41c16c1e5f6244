"""Training progress people can read: a live bar in a terminal, plain log lines elsewhere."""

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from vae_lightning.training.lit_module import UNITS

log = logging.getLogger(__name__)


def significant(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits, written out (6.812, -5979, 0.06660)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    places = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{places}f}"


def test_line(metrics: dict[str, float]) -> str:
    """The test metrics in one line, each with its unit: what a run prints when it ends."""
    parts = [
        f"test/{name} {significant(metrics[f'test/{name}'])} {UNITS[name]}"
        for name in ("bpd", "elbo", "kl", "recon_mse", "loss")
        if f"test/{name}" in metrics
    ]
    return "Test of the best checkpoint: " + " | ".join(parts)


def progress_bar(every_n_steps: int = 100) -> ProgressBar:
    """Rich's live bar (with the training loss and the last val/bpd) when stdout is a terminal;
    otherwise ``ProgressLog``, whose lines also reach ``train.log``."""
    if sys.stdout.isatty():
        return LiveBar()
    return ProgressLog(every_n_steps)


class LiveBar(RichProgressBar):
    """Rich's bar, with the training loss of the last logging step beside Lightning's metrics:
    the module logs it as a value on the host, so drawing it never waits for the device. The
    logger's version number (``v_num``) is left out: the run folder names the run. The run's
    log files (``train.log``) get ``ProgressLog``'s line after every epoch, so a run watched in
    a terminal leaves the same history as one whose output went to a file."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_lines = ProgressLog(every_n_steps=0, log_files_only=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.epoch_lines.on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.epoch_lines.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.epoch_lines.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.epoch_lines.on_train_epoch_end(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        """``Epoch 1/2`` for the first of two, as the log lines count (Lightning: ``0/1``)."""
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch + 1}"
        if epochs is not None and epochs > 0:
            description += f"/{epochs}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if (loss := trainer.callback_metrics.get("train/loss")) is not None:
            metrics["train/loss"] = float(loss)
        return metrics


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressLog(ProgressBar):
    """One plain log line after every epoch, and every ``every_n_steps`` training steps
    (0: epochs only), for output that goes to a file (SLURM, nohup, CI):

    ``epoch 3/20 step 1056 | 812 img/s | train/loss 1234.5 | val/bpd 6.912 | 4m12s, ~12m30s left``

    A ``ProgressBar``, so that Lightning adds no bar of its own. With ``log_files_only`` the
    lines go to the log files alone (``LiveBar`` draws the terminal).
    """

    def __init__(self, every_n_steps: int = 100, log_files_only: bool = False) -> None:
        super().__init__()
        if (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 0
        ):
            raise ValueError(f"every_n_steps={every_n_steps!r}: it must be an integer >= 0")
        self.every_n_steps = every_n_steps
        self.log_files_only = log_files_only
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._windows = {"step": [0.0, 0], "epoch": [0.0, 0]}  # start time, images since

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._first_step = trainer.global_step
        self._open_windows()  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open_windows()

    def _open_windows(self) -> None:
        self._windows = {name: [time.monotonic(), 0] for name in self._windows}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        for window in self._windows.values():
            window[1] += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > self._first_step:
            self._report(trainer, "step")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "epoch")

    @rank_zero_only
    def _report(self, trainer: L.Trainer, window: str) -> None:
        """A line; images/s over the steps since the last step line, or over the epoch."""
        if not self._enabled:
            return
        now = time.monotonic()
        start, images = self._windows[window]
        speed = images / max(now - start, 1e-9)
        self._windows["step"] = [now, 0]
        suffix = " (end)" if window == "epoch" else ""
        elapsed = now - self._started
        done = trainer.global_step - self._first_step
        total = trainer.estimated_stepping_batches
        left = (total - trainer.global_step) * elapsed / done if done else math.inf
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        parts = [f"epoch {trainer.current_epoch + 1}/{epochs}{suffix} step {trainer.global_step}"]
        parts.append(f"{speed:.0f} img/s")
        metrics = trainer.callback_metrics
        for key, fmt in (("train/loss", "{:.1f}"), ("val/bpd", "{:.4f}")):
            if key in metrics:
                parts.append(f"{key} {fmt.format(float(metrics[key]))}")
        parts.append(f"{_duration(elapsed)}, ~{_duration(left)} left")
        if not self.log_files_only:
            log.info(" | ".join(parts))
            return
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, " | ".join(parts), (), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
